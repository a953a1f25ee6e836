"""Every command the README documents is a command the CLI accepts.

Each ``tritium ...`` line in the README's bash blocks (and each ``deepspeed``/
``torchrun`` line that starts ``tritium.train``) is parsed by the real argument
parser, so a renamed or removed flag fails here instead of in a user's shell.
A few are also run for real; the quick demo test runs the rest end to end.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tritium.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def _shell_blocks(text: str) -> list[str]:
    """Bash blocks whole, and the ``$ ...`` prompt lines of transcript (text) blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    for block in re.findall(r"```text\n(.*?)```", text, flags=re.DOTALL):
        blocks.append("\n".join(line[2:] for line in block.splitlines() if line.startswith("$ ")))
    return blocks


def documented_commands() -> list[list[str]]:
    """argv lists (without the program name) for tritium, plus train-module argv from the launchers."""
    commands: list[list[str]] = []
    for block in _shell_blocks(README.read_text()):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for segment in line.split("|"):
                try:
                    words = shlex.split(segment, comments=True)
                except ValueError:
                    continue
                for redirect in (">", ">>", "2>", "<"):
                    if redirect in words:
                        words = words[:words.index(redirect)]
                if not words:
                    continue
                if words[0] == "tritium":
                    commands.append(words[1:])
                elif words[0] in ("deepspeed", "torchrun"):
                    for flag in ("--module", "-m"):
                        if flag in words and words[words.index(flag) + 1] == "tritium.train":
                            commands.append(["train", *words[words.index(flag) + 2:]])
    return commands


COMMANDS = documented_commands()


def test_readme_documents_every_stage():
    used = {argv[0] for argv in COMMANDS if argv}
    assert {"describe", "tokenizer", "data", "train", "sft", "dpo", "align-eval", "generate", "serve",
            "serve-bench", "bench"} <= used


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:80] for a in COMMANDS])
def test_documented_command_parses(argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports the bad flag on stderr and exits 2
        pytest.fail(f"README command `tritium {' '.join(argv)}` is rejected by the CLI (exit {exc.code})")


def test_describe_llama2_7b_prints_the_exact_count(capsys):
    assert main(["describe", "--preset", "llama2-7b"]) == 0
    assert "6,738,415,616" in capsys.readouterr().out


def test_describe_json_is_machine_readable(capsys):
    assert main(["describe", "--preset", "1b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] > 1_000_000_000


def test_bench_list_names_every_area(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for case in ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy", "attention", "decode_attention",
                 "model_step", "decode_step", "engine_throughput"):
        assert case in out


def test_kernels_three_line_example_runs():
    """The README's 'use the kernels in your own model' lines, with tensors made up for them."""
    import torch

    from tritium.kernels import fused_linear_cross_entropy
    from tritium.kernels.norm import rms_norm, rms_norm_ref

    torch.manual_seed(0)
    x, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    weight = 1 + 0.1 * torch.randn(48)
    h, new_residual = rms_norm(x, weight, eps=1e-5, residual=residual)
    ref_h, ref_residual = rms_norm_ref(x, weight, eps=1e-5, residual=residual)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(new_residual, ref_residual)
    hidden, head = torch.randn(10, 48), torch.randn(97, 48)
    labels = torch.randint(0, 97, (10,))
    loss = fused_linear_cross_entropy(hidden, head, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ head.T, labels), rtol=1e-4, atol=1e-5)
