"""``tritium tokenizer train|encode|decode``: the vocabulary, from the command line."""
from __future__ import annotations

import argparse
import json
import sys
import time

from tritium.flags import deprecated_alias
from tritium.model.corpus import DEFAULT_CORPUS_BYTES
from tritium.model.tokenizer import Tokenizer, train_tokenizer

HELP = "train a sentencepiece BPE tokenizer (embedded corpus by default), encode or decode text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)

    train = actions.add_parser("train", help="learn a byte-fallback BPE vocabulary",
                               description="Learn a byte-fallback BPE vocabulary with the chat markers as "
                                           "single tokens. Without --data, trains on the embedded corpus "
                                           "(this Python's standard-library source).")
    train.add_argument("--data", nargs="+", default=None, metavar="PATH",
                       help="text files, JSONL files with a 'text' field, or folders (default: embedded corpus)")
    deprecated_alias(train, "--input", "--data", "data", nargs="+")
    train.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size (default 2048)")
    train.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.model")
    train.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES,
                       help=f"read at most this much text (default {DEFAULT_CORPUS_BYTES:,})")
    deprecated_alias(train, "--max-bytes", "--corpus-bytes", "corpus_bytes", type=int)

    encode = actions.add_parser("encode", help="print the token ids of some text")
    encode.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer.model or its folder")
    encode.add_argument("text", nargs="?", default=None, help="text to encode (default: standard input)")
    encode.add_argument("--bos", action="store_true", help="prepend the bos token")
    encode.add_argument("--eos", action="store_true", help="append the eos token")
    encode.add_argument("--pieces", action="store_true", help="print the pieces as well as the ids")

    decode = actions.add_parser("decode", help="print the text of some token ids")
    decode.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer.model or its folder")
    decode.add_argument("ids", nargs="*", type=int, help="token ids (default: whitespace-separated on stdin)")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        if args.corpus_bytes <= 0:
            raise ValueError(f"--corpus-bytes must be positive, got {args.corpus_bytes}")
        start = time.perf_counter()
        tokenizer = train_tokenizer(args.data, args.vocab_size, args.out, max_bytes=args.corpus_bytes)
        seconds = time.perf_counter() - start
        source = "embedded corpus (Python stdlib source)" if not args.data else ", ".join(args.data)
        print(f"trained {tokenizer.vocab_size}-token BPE tokenizer on {source} in {seconds:.1f}s")
        print(f"wrote {tokenizer.source}")
        print(f"fingerprint {tokenizer.fingerprint[:16]}  bos={tokenizer.bos_id} eos={tokenizer.eos_id} "
              f"pad={tokenizer.pad_id}  markers={json.dumps(tokenizer.special_ids)}")
        return 0
    tokenizer = Tokenizer.load(args.tokenizer)
    if args.action == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tokenizer.encode(text, bos=args.bos, eos=args.eos)
        print(" ".join(map(str, ids)))
        if args.pieces:
            print(" ".join(tokenizer.id_to_piece(i) for i in ids))
        return 0
    ids = args.ids if args.ids else [int(tok) for tok in sys.stdin.read().split()]
    sys.stdout.write(tokenizer.decode(ids) + "\n")
    return 0
