"""``tritium data prepare|info``: tokenize a corpus into shards, and look at what was made."""
from __future__ import annotations

import argparse
import time

from tritium.flags import deprecated_alias
from tritium.model.corpus import DEFAULT_CORPUS_BYTES

HELP = "tokenize a corpus into binary shards with a train/validation split (prepare), or summarise them (info)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    prepare = actions.add_parser(
        "prepare", help="tokenize text into .bin shards + manifest.json",
        description="Tokenize documents (<bos> text <eos>) into uint16/uint32 shards with a manifest, split "
                    "train/validation by document. Without --data, uses the embedded corpus.")
    prepare.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer.model or its folder")
    prepare.add_argument("--data", nargs="+", default=None, metavar="PATH",
                         help="text files, JSONL files with a 'text' field, or folders (default: embedded corpus)")
    deprecated_alias(prepare, "--input", "--data", "data", nargs="+")
    prepare.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and manifest.json")
    prepare.add_argument("--val-fraction", type=float, default=0.05,
                         help="fraction of documents held out for validation (default 0.05)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    prepare.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES,
                         help=f"size of the embedded corpus when no --data (default {DEFAULT_CORPUS_BYTES:,})")
    deprecated_alias(prepare, "--max-bytes", "--corpus-bytes", "corpus_bytes", type=int)

    info = actions.add_parser("info", help="summarise a prepared folder and decode a sample")
    info.add_argument("data", metavar="DIR", help="folder written by `tritium data prepare`")
    info.add_argument("--tokenizer", default=None, metavar="DIR", help="check the fingerprint and decode a sample")
    info.add_argument("--seq-len", type=int, default=64, help="length of the decoded sample (default 64)")


def run(args: argparse.Namespace) -> int:
    from tritium.model.tokenizer import Tokenizer
    from tritium.train.data import PackedDataset, prepare_data, read_manifest

    if args.action == "prepare":
        if args.corpus_bytes <= 0:
            raise ValueError(f"--corpus-bytes must be positive, got {args.corpus_bytes}")
        tokenizer = Tokenizer.load(args.tokenizer)
        start = time.perf_counter()
        manifest = prepare_data(args.data, tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                max_bytes=args.corpus_bytes)
        seconds = time.perf_counter() - start
        _print_summary(args.out, manifest)
        print(f"prepared in {seconds:.1f}s")
        return 0

    manifest = read_manifest(args.data)
    _print_summary(args.data, manifest)
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
        dataset = PackedDataset(args.data, "train", seq_len=args.seq_len, tokenizer_fingerprint=tokenizer)
        sample = dataset.sequence(0)["input_ids"]
        print(f"tokenizer matches; first train sequence decoded:\n{tokenizer.decode(sample)!r}")
    return 0


def _print_summary(data_dir, manifest) -> None:
    tok = manifest["tokenizer"]
    print(f"{data_dir}: {manifest['dtype']} tokens, tokenizer {tok['fingerprint'][:12]} (vocab {tok['vocab_size']})")
    for split, info in manifest["splits"].items():
        print(f"  {split:<10} {info['tokens']:>12,} tokens {info['docs']:>8,} documents "
              f"{len(info['shards']):>3} shard(s)")
