"""``tritium generate``: stream a completion of one prompt from a checkpoint to the terminal."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HELP = "generate text from a checkpoint (streams to the terminal; --chat applies the chat template)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None,
                        help="the prompt (or the user message with --chat); '-' or omitted reads stdin")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint folder: config.json + model.safetensors + tokenizer.model (a run's final/)")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="tokenizer.model or its folder (default: the checkpoint folder)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    group.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    group.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x top probability")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    group.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    group.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop string (repeatable); the output is cut before it")
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence/end-of-turn")
    runtime = parser.add_argument_group("runtime")
    add_model_arguments(runtime)
    runtime.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly even on CUDA")
    runtime.add_argument("--no-stream", action="store_true", help="print the completion once, at the end")
    runtime.add_argument("--stats", action="store_true", help="print tokens and tokens/s to stderr at the end")
    add_speculative_arguments(parser)


def add_model_arguments(group) -> None:
    """How the checkpoint is loaded (``generate`` and ``serve``): --device, --dtype, --backend,
    --no-verify-checksums, --tensor-parallel; read back by ``load_model_and_tokenizer``."""
    group.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weights/KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--backend", default=None, help="kernel backend (default: the checkpoint's config)")
    group.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false", default=None,
                       help="load weights whose checksums.sha256 does not match (files changed on purpose)")
    group.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="split the model over N ranks (GPUs, or CPU processes), each holding 1/N of the heads "
                            "and FFN; this process is rank 0 and starts the others (default 1)")


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """--speculative, --draft-checkpoint, --num-speculative-tokens (``generate`` and ``serve``)."""
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--speculative", choices=("ngram", "draft"), default=None,
                      help="propose tokens by prompt lookup (ngram) or a draft model, verify K per forward pass")
    spec.add_argument("--draft-checkpoint", metavar="DIR", default=None,
                      help="draft model checkpoint sharing the tokenizer (with --speculative draft)")
    spec.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                      help="tokens proposed per verification pass (default 4; with --speculative)")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is None or args.prompt == "-":
        if sys.stdin.isatty() and args.prompt is None:
            raise ValueError("give a prompt (a positional argument, or '-' to read stdin)")
        return sys.stdin.read()
    return args.prompt


def load_for_inference(checkpoint: str | Path, tokenizer_path: str | Path | None = None, device: str = "auto",
                       dtype: str = "auto", backend: str | None = None, verify: bool | None = None):
    """(model, tokenizer) from a checkpoint folder, on ``device`` in ``dtype``, in eval mode.

    ``verify`` False skips the ``checksums.sha256`` check (None: unless ``TRITIUM_VERIFY_CHECKSUMS=0``)."""
    import torch

    from tritium.model.transformer import Transformer

    checkpoint, tokenizer = _open_checkpoint(checkpoint, tokenizer_path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    model = Transformer.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device=device, backend=backend,
                                        verify=verify)
    return model.eval(), tokenizer


def _open_checkpoint(checkpoint: str | Path, tokenizer_path: str | Path | None):
    """(folder, tokenizer), the tokenizer checked against the folder's config.json before any weight is
    read (or, with tensor parallelism, any rank started)."""
    from tritium.model.checkpoint import read_config
    from tritium.model.tokenizer import Tokenizer

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
    tokenizer = Tokenizer.load(tokenizer_path or checkpoint)
    vocab_size = read_config(checkpoint).vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer vocab ({tokenizer.vocab_size}) is larger than the model's "
                         f"({vocab_size}): wrong tokenizer for this checkpoint?")
    return checkpoint, tokenizer


def _check_same_tokenizer(draft_dir: Path, tokenizer_path: Path) -> None:
    """A draft folder carrying its own tokenizer must carry the target's: the same size is not the same vocabulary
    (its proposals would be other tokens, all rejected)."""
    from tritium.model.tokenizer import Tokenizer

    mine = draft_dir / "tokenizer.model"
    theirs = tokenizer_path / "tokenizer.model" if tokenizer_path.is_dir() else tokenizer_path
    if not mine.is_file() or not theirs.is_file() or mine.read_bytes() == theirs.read_bytes():
        return
    a, b = Tokenizer.load(mine), Tokenizer.load(theirs)
    if len(a) != len(b) or any(a.id_to_piece(i) != b.id_to_piece(i) for i in range(len(a))):
        raise ValueError(f"its tokenizer.model is not the target's ({theirs}); the draft must share the target's "
                         "tokenizer")


def speculative_from_args(args: argparse.Namespace, target=None):
    """The ``SpeculativeDecoder`` the flags ask for, or None. With ``target`` (the loaded model) a draft
    checkpoint with another vocabulary is a ValueError naming --draft-checkpoint."""
    from tritium.serve.speculative import SpeculativeDecoder

    k = getattr(args, "num_speculative_tokens", None)
    if args.speculative is None:
        if args.draft_checkpoint is not None:
            raise ValueError("--draft-checkpoint needs --speculative draft")
        if k is not None:
            raise ValueError("--num-speculative-tokens needs --speculative ngram|draft")
        return None
    k = 4 if k is None else k
    if k < 1:
        raise ValueError(f"--num-speculative-tokens must be >= 1, got {k}")
    if args.speculative == "ngram":
        if args.draft_checkpoint is not None:
            raise ValueError("--draft-checkpoint is for --speculative draft, not ngram")
        return SpeculativeDecoder.ngram(k)
    if args.draft_checkpoint is None:
        raise ValueError("--speculative draft needs --draft-checkpoint DIR")
    # The draft is read with the target's tokenizer (they must share it), through the same checksum check.
    tokenizer_path = getattr(args, "tokenizer", None) or args.checkpoint
    try:
        if not Path(args.draft_checkpoint).is_dir():
            raise FileNotFoundError("folder not found")
        if target is not None:  # another vocabulary: say so before loading (and before the tokenizer check)
            from tritium.model.checkpoint import read_config

            vocab_size = read_config(args.draft_checkpoint).vocab_size
            if vocab_size != target.config.vocab_size:
                raise ValueError(f"vocab_size {vocab_size} differs from --checkpoint's {target.config.vocab_size}; "
                                 "the draft must share the target's tokenizer")
        _check_same_tokenizer(Path(args.draft_checkpoint), Path(tokenizer_path))
        draft, _ = load_for_inference(args.draft_checkpoint, tokenizer_path, args.device, args.dtype, args.backend,
                                      verify=getattr(args, "verify_checksums", None))
    except (ValueError, OSError) as exc:  # a missing folder, a checksum mismatch, another vocabulary, ...
        raise ValueError(f"--draft-checkpoint {args.draft_checkpoint}: {exc}") from None
    if target is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"--draft-checkpoint {args.draft_checkpoint}: vocab_size {draft.config.vocab_size} differs "
                         f"from --checkpoint's {target.config.vocab_size}; the draft must share the target's tokenizer")
    if target is not None and draft.config.max_seq_len < target.config.max_seq_len:
        print(f"tritium: warning: --draft-checkpoint {args.draft_checkpoint} has max_seq_len "
              f"{draft.config.max_seq_len} < the target's {target.config.max_seq_len}: longer sequences decode "
              "without speculation", file=sys.stderr)
    return SpeculativeDecoder.draft(draft, k)


def run(args: argparse.Namespace) -> int:
    from tritium.serve.sampling import SamplingParams

    text = _read_prompt(args)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    model, tokenizer = load_model_and_tokenizer(args)
    try:
        return _generate(args, text, params, model, tokenizer)
    finally:
        if hasattr(model, "close"):  # tensor parallel: stop the other ranks
            model.close()


def load_model_and_tokenizer(args: argparse.Namespace):
    """``load_for_inference``, or with ``--tensor-parallel N`` > 1 the ranks' model (rank 0's view)."""
    tensor_parallel = getattr(args, "tensor_parallel", 1)
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if tensor_parallel == 1 and world > 1:  # every rank would run its own whole copy (and fight for the port)
        raise ValueError(f"started by a launcher with WORLD_SIZE={world}: pass --tensor-parallel {world} (or run "
                         "one process without torchrun)")
    if tensor_parallel == 1:
        return load_for_inference(args.checkpoint, getattr(args, "tokenizer", None), args.device, args.dtype,
                                  args.backend, verify=args.verify_checksums)
    if tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    if getattr(args, "speculative", None) is not None:
        raise ValueError("--speculative does not combine with --tensor-parallel yet")
    from tritium.serve.tensor_parallel import launch

    checkpoint, tokenizer = _open_checkpoint(args.checkpoint, getattr(args, "tokenizer", None))
    model = launch(checkpoint, tensor_parallel, device=args.device, dtype=args.dtype, backend=args.backend,
                   verify=args.verify_checksums)
    return model, tokenizer


def _generate(args: argparse.Namespace, text: str, params, model, tokenizer) -> int:
    from tritium.serve.generator import Generator
    from tritium.serve.sequence import encode_prompt

    if args.chat:
        from tritium.model.chat import encode_prompt as encode_chat_prompt

        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": text}]
        prompt_ids = encode_chat_prompt(tokenizer, messages)
    else:
        if args.system:
            raise ValueError("--system needs --chat")
        prompt_ids = encode_prompt(tokenizer, text)
    # CUDA graphs cannot capture tensor parallelism's control broadcast: eager there.
    compile = not args.no_cuda_graph and getattr(args, "tensor_parallel", 1) == 1
    generator = Generator(model, tokenizer, compile=compile, speculative=speculative_from_args(args, model))
    start = time.perf_counter()
    completion_tokens = 0
    if args.no_stream:
        completion = generator.generate([prompt_ids], params)[0]
        sys.stdout.write(completion.text)
        completion_tokens, reason = completion.completion_tokens, completion.finish_reason
    else:
        for delta in generator.stream(prompt_ids, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        done = generator.last_completion
        completion_tokens, reason = done.completion_tokens, done.finish_reason
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        elapsed = time.perf_counter() - start
        print(f"[{len(prompt_ids)} prompt tokens, {completion_tokens} completion tokens in {elapsed:.2f}s "
              f"({completion_tokens / max(elapsed, 1e-9):.1f} tok/s), finish_reason={reason}]", file=sys.stderr)
        if generator.speculative is not None:
            print(f"[{generator.speculative.stats.summary()}]", file=sys.stderr)
    return 0
