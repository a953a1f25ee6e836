"""``tritium demo``: the four stages of a model's life on the embedded default.

Every step is an ordinary ``tritium`` command, printed before it runs, so a
user can rerun any of them with their own data.  Everything lands in one run
folder, summarised in ``report.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tritium.model.config import ModelConfig
from tritium.model.tokenizer import Tokenizer
from tritium.net import free_port
from tritium.runs import claim_run_folder

# Commands light enough to run inside the demo's process (see Demo.tritium).
_IN_PROCESS = frozenset({"describe", "tokenizer", "data", "generate", "serve-bench"})

# Prompts in the embedded tasks' formats (align/tasks.py), so the aligned model's answers can be checked by eye.
_DEMO_PROMPTS = ("add: 12 + 7", "reverse: c a t", "sort: 5 2 8")

HELP = "run the whole lifecycle (before, during, alignment, after) on the embedded default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo",
                        help="run folder (default runs/demo; OUT/final is the aligned model the README's examples use)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out run folder")
    parser.add_argument("--quick", action="store_true",
                        help="the short form (about 2.5 minutes on 2 idle CPU cores; the default form about 10)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="training ranks (default: 2 on CPU, every GPU on a GPU machine)")
    parser.add_argument("--skip-serve", action="store_true", help="stop after generation (no HTTP server)")


@dataclass
class Demo:
    out: Path
    quick: bool
    nproc: int
    log: list[dict] = field(default_factory=list)

    def tritium(self, *args: str, title: str) -> int:
        """Print ``tritium ARGS`` and run it; a failure stops the demo.

        Commands that only load a small model (describe, tokenizer, data, generate, serve-bench) run in
        this process through the same ``tritium.cli.main`` a shell would reach: each subprocess would
        pay Python and torch start-up again (seconds each on 2 cores).  Training commands start their
        own processes (DeepSpeed ranks) and run as a subprocess, as from a shell.
        """
        shown = "tritium " + " ".join(shlex.quote(str(a)) for a in args)
        print(f"\n\033[1m$ {shown}\033[0m   # {title}", flush=True)
        start = time.time()
        argv = [str(a) for a in args]
        if argv[0] in _IN_PROCESS:
            from tritium.cli import main

            code = main(argv)
            sys.stdout.flush()
        else:
            code = subprocess.run([sys.executable, "-m", "tritium.cli", *argv], env=dict(os.environ)).returncode
        seconds = time.time() - start
        self.log.append({"command": shown, "title": title, "seconds": round(seconds, 1), "exit": code})
        if code != 0:
            raise RuntimeError(f"demo step failed ({title}): `{shown}` exited {code}")
        return code


def _save_untrained(out: Path) -> None:
    """The tiny model as initialised, saved like any checkpoint so `tritium generate` can sample it."""
    # torch (and the model, which imports it) load here, not at import: `tritium --help` imports this module.
    import torch

    from tritium.model.transformer import Transformer

    print("\n(python) Transformer(ModelConfig.from_name('tiny')).save_pretrained(RUN/untrained)")
    torch.manual_seed(0)
    Transformer(ModelConfig.from_name("tiny")).save_pretrained(out / "untrained")
    Tokenizer.load(out / "tokenizer").save(out / "untrained")


def link_final(out: Path) -> None:
    """OUT/final: the aligned (DPO) model under the name every run folder gives its model, so the README's
    `--checkpoint runs/demo/final` examples work after `tritium demo`.  A relative link (a copy where links
    are not allowed)."""
    import shutil

    final = out / "final"
    try:
        final.symlink_to(Path("dpo") / "final", target_is_directory=True)
    except OSError:
        shutil.copytree(out / "dpo" / "final", final)
    print(f"\n{final} -> dpo/final: the aligned model (`--checkpoint {final}` in the README's examples)")


def _default_nproc() -> int:
    import torch  # lazy: see _save_untrained

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def run(args: argparse.Namespace) -> int:
    out = claim_run_folder(args.out, overwrite=args.overwrite, resumable=False)
    out.mkdir(parents=True, exist_ok=True)
    nproc = args.nproc or _default_nproc()
    demo = Demo(out=out, quick=args.quick, nproc=nproc)
    started = time.time()
    q = args.quick
    # The quick form shows every stage run for real in about 2.5 minutes on 2 idle cores; its numbers mean little.
    steps = {"pretrain": 20 if q else 300, "sft": 24 if q else 300, "dpo": 6 if q else 50, "grpo": 2 if q else 60}
    # The quick form draws fewer task prompts (same per-task in sft, dpo and eval keeps the splits aligned).
    tasks = ["--per-task", "150"] if q else []

    print("\n=== 1. Before: the dials fix the shape, the tokenizer fixes the vocabulary ===")
    for preset in ("tiny", "seed-7b", "llama2-7b"):
        demo.tritium("describe", "--preset", preset, "--gpus", "8", title=f"size the {preset} preset")
    corpus = ["--corpus-bytes", "1000000"] if q else []
    demo.tritium("tokenizer", "train", "--vocab-size", "2048", "--out", out / "tokenizer", *corpus,
                 title="train a sentencepiece BPE tokenizer on the embedded corpus")
    demo.tritium("data", "prepare", "--tokenizer", out / "tokenizer", "--out", out / "data", *corpus,
                 title="tokenize the embedded corpus into shards")

    print("\n=== 2. During: pretraining on DeepSpeed ZeRO ===")
    _save_untrained(out)
    sample = ["--max-tokens", "40", "--temperature", "0.8", "--seed", "0", "def "]
    demo.tritium("generate", "--checkpoint", out / "untrained", *sample,
                 title="a sample from the untrained model: gibberish")
    demo.tritium("train", "--preset", "tiny", "--nproc", nproc, "--zero-stage", "2", "--data", out / "data",
                 "--tokenizer", out / "tokenizer",
                 "--max-steps", steps["pretrain"], "--eval-interval", steps["pretrain"] // (2 if q else 4),
                 "--save-interval", 0, "--out", out / "pretrain",
                 title=f"pretrain the tiny model, {nproc} ranks, ZeRO-2")
    demo.tritium("generate", "--checkpoint", out / "pretrain" / "final", *sample,
                 title="the same prompt after pretraining")

    print("\n=== 3. Alignment: SFT, then DPO and GRPO, measured ===")
    demo.tritium("sft", "--checkpoint", out / "pretrain" / "final", "--nproc", nproc, "--max-steps", steps["sft"],
                 "--save-interval", 0, *tasks, "--out", out / "sft",
                 title="supervised fine-tuning on the embedded instruction tasks")
    demo.tritium("dpo", "--checkpoint", out / "sft" / "final", "--nproc", nproc, "--max-steps", steps["dpo"],
                 "--save-interval", 0, *tasks, "--out", out / "dpo",
                 title="preference tuning (DPO) against the SFT model as reference")
    demo.tritium("grpo", "--checkpoint", out / "sft" / "final", "--nproc", nproc, "--max-steps", steps["grpo"],
                 *tasks, "--out", out / "grpo",
                 title="RL from verifiable rewards (GRPO): rollouts from tritium's engine, scored by the task verifiers")
    demo.tritium("align-eval", "--checkpoint", out / "pretrain" / "final", out / "sft" / "final",
                 out / "dpo" / "final", out / "grpo" / "final", "--labels", "pretrained", "sft", "dpo", "grpo",
                 "--reference-checkpoint", out / "sft" / "final",
                 "--out", out / "align-eval", *tasks, *(["--max-examples", "40", "--max-pairs", "40"] if q else []),
                 title="before/after table: exact match, format compliance, preference accuracy")

    print("\n=== 4. After: frozen weights, KV-cached generation, an OpenAI-compatible server ===")
    link_final(out)
    demo.tritium("generate", "--checkpoint", out / "final", "--chat", "--max-tokens", "24",
                 "--greedy", _DEMO_PROMPTS[0], title="stream a chat answer with the KV cache")
    if not args.skip_serve:
        _serve_stage(demo)
    _write_report(demo, time.time() - started)
    print(f"\n[demo] done in {time.time() - started:.0f} s. Everything is in {out}/ (summary: {out / 'report.md'})")
    return 0


def _serve_stage(demo: Demo) -> None:
    import httpx  # lazy: a second of start-up for every `tritium` command otherwise

    port = free_port()
    ckpt = demo.out / "final"
    cmd = ["tritium", "serve", "--checkpoint", str(ckpt), "--port", str(port)]
    print(f"\n\033[1m$ {' '.join(cmd)} &\033[0m   # serve on 127.0.0.1 in the background", flush=True)
    log_file = open(demo.out / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "tritium.cli", *cmd[1:]], stdout=log_file,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    demo.log.append({"command": " ".join(cmd), "title": "serve on 127.0.0.1 in the background", "seconds": "-",
                     "exit": 0})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited early ({server.returncode}); see {demo.out / 'serve.log'}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("server did not become ready within 120 s")
        exchanges = []
        with httpx.Client(base_url=base, timeout=60) as client:
            for prompt in _DEMO_PROMPTS:
                body = {"model": "tritium", "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 24, "temperature": 0}
                print(f"POST /v1/chat/completions {json.dumps(body)}")
                reply = client.post("/v1/chat/completions", json=body).json()
                answer = reply["choices"][0]["message"]["content"]
                print(f"  -> {answer!r}  usage={reply['usage']}")
                exchanges.append({"prompt": prompt, "answer": answer, "usage": reply["usage"]})
            metrics = client.get("/metrics").text
        shown = [line for line in metrics.splitlines() if line.startswith("tritium_") and "_bucket" not in line]
        print("GET /metrics (excerpt):\n  " + "\n  ".join(shown[:14]))
        (demo.out / "serve_exchanges.json").write_text(json.dumps(exchanges, indent=2) + "\n")
        demo.tritium("serve-bench", "--url", base, "--concurrency", "4", "--requests", "8" if demo.quick else "32",
                     "--prompt-tokens", "8,32", "--max-tokens", "8,16", "--requests-per-s", "5", "--model-config", "tiny",
                     "--json", demo.out / "serve_bench.json",
                     title="load the server and turn measured tokens/s into GPUs needed and cost per 1M tokens")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()


def _write_report(demo: Demo, seconds: float) -> None:
    out = demo.out
    summary = (f"Run folder: `{out}`; {demo.nproc} training ranks; "
               f"{'quick' if demo.quick else 'default'} form; {seconds:.0f} s in all.")
    lines = ["# tritium demo report", "", summary, "",
             "| step | command | seconds |", "|---|---|---|"]
    lines += [f"| {e['title']} | `{e['command']}` | {e['seconds']} |" for e in demo.log]
    for title, path in (("Alignment before/after", out / "align-eval" / "table.md"),
                        ("Serving load and cost", out / "serve-bench" / "report.md")):
        if path.exists():
            lines += ["", f"## {title}", "", path.read_text()]
    for png in sorted(out.rglob("*.png")):
        lines += ["", f"![{png.stem}]({png.relative_to(out)})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
