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


# ---------------------------------------------------------------------------------------------------------
# The cheap examples, run end to end as written (in a scratch folder standing in for the user's checkout).
# What is substituted is what the README itself says to substitute (its placeholder paths, the port a
# server got) plus a smaller --requests for the load test; everything else is the README's own text.
# Training, SFT, DPO and align-eval run in tests/test_demo.py (the quick demo) and tests/train.
def _readme_command(prefix: str) -> list[str]:
    """The one documented command starting with ``tritium <prefix>`` (it must exist, exactly once)."""
    found = [argv for argv in COMMANDS if " ".join(argv).startswith(prefix)]
    assert len(found) == 1, f"the README should document `tritium {prefix}...` exactly once, found {found}"
    return list(found[0])


def _readme_block(language: str, first_line: str) -> str:
    for block in re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no ```{language} block starting with {first_line!r} in the README")


def _run(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"`tritium {' '.join(argv)}` exited {code}:\n{out[-2000:]}\n{err[-2000:]}"
    return out


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A scratch working directory holding what the README's examples expect to find: the tokenizer and
    data of its "Before training" section, and runs/demo/final laid out as `tritium demo` leaves it."""
    import os

    import torch

    from tritium.model.config import ModelConfig
    from tritium.model.tokenizer import Tokenizer
    from tritium.model.transformer import Transformer

    root = tmp_path_factory.mktemp("checkout")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(_readme_command("tokenizer train")) == 0
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny"))
        model.save_pretrained(root / "runs/demo/dpo/final")
        Tokenizer.load(root / "runs/tokenizer").save(root / "runs/demo/dpo/final")
        from tritium.demo import link_final

        link_final(root / "runs/demo")  # the demo's own code makes runs/demo/final
    finally:
        os.chdir(cwd)
    return root


def test_readme_before_training_examples_run(checkout, capsys, monkeypatch):
    monkeypatch.chdir(checkout)
    for argv in COMMANDS:
        if argv[0] == "describe" and "--config" not in argv:
            _run(argv, capsys)
    encoded = _run(_readme_command("tokenizer encode"), capsys)
    assert "▁▁▁▁" in encoded.splitlines()[1]  # the pieces line, as the README shows it
    out = _run(_readme_command("data prepare"), capsys)
    assert "train" in out and "validation" in out and (checkout / "runs/data/manifest.json").is_file()


def test_readme_generation_examples_run(checkout, capsys, monkeypatch):
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as a user runs it: the CPU reference ops
    # every generate example on the demo model (the draft-model one names placeholder folders: it only parses)
    generations = [argv for argv in COMMANDS if argv[:3] == ["generate", "--checkpoint", "runs/demo/final"]]
    assert len(generations) == 5
    for argv in generations:
        if "--tensor-parallel" in argv:
            continue  # starts ranks and a process group: below, in its own process as a user runs it
        out = _run(argv, capsys, stdin="import os" if argv[-1] == "-" or "-" in argv else None,
                   monkeypatch=monkeypatch)
        assert out.strip() or "--chat" in argv
    import subprocess
    import sys

    (tensor_parallel,) = [argv for argv in generations if "--tensor-parallel" in argv]
    result = subprocess.run([sys.executable, "-m", "tritium.cli", *tensor_parallel], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.mark.slow
def test_readme_serving_examples_run(checkout, capsys, monkeypatch):
    """`tritium serve` with the README's key, policy and docs; its curl and OpenAI-client requests; serve-bench."""
    import subprocess
    import sys
    import time

    import httpx

    from tritium.net import free_port

    monkeypatch.chdir(checkout)
    (checkout / "policy.yaml").write_text(_readme_block("yaml", "# policy.yaml"))
    (checkout / "handbook").mkdir(exist_ok=True)
    (checkout / "handbook" / "faq.md").write_text("A KV cache keeps the keys and values of earlier tokens.\n")
    home = checkout / "home"  # the README's key file, ~/.config/tritium/api-key, holding the key its clients send
    (home / ".config" / "tritium").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "tritium" / "api-key").write_text("s3cret\n")
    serve = _readme_command("serve --checkpoint runs/demo/final --api-key")
    port = str(free_port())
    argv = [*serve, "--port", port, "--log-level", "warning"]
    server = subprocess.Popen([sys.executable, "-m", "tritium.cli", *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "TRITON_INTERPRET": "0", "HOME": str(home)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert server.poll() is None, server.stderr.read()[-3000:]
        # the curl examples, as written (their JSON bodies and headers), against this port
        for body in re.findall(r"-d '(\{.*?\})'", _readme_block("bash", "curl -s http://127.0.0.1:8000")):
            reply = httpx.post(f"{url}/v1/{'chat/completions' if 'messages' in body else 'completions'}",
                               content=body, timeout=60, headers={"Authorization": "Bearer s3cret",
                                                                  "Content-Type": "application/json"})
            assert reply.status_code == 200, reply.text  # the README's policy lets the demo model answer
            assert "data: [DONE]" in reply.text if '"stream": true' in body else reply.json()["usage"]
        # the OpenAI-client example, as written, pointed at this port
        pytest.importorskip("openai")
        exec(compile(_readme_block("python", "from openai import OpenAI").replace(
            "http://127.0.0.1:8000", url), "README openai example", "exec"), {})
        # serve-bench against the keyed server, its flags as written (fewer requests, to stay quick)
        bench = _readme_command("serve-bench --url")
        bench[bench.index("--url") + 1] = url
        bench[bench.index("--requests") + 1] = "8"
        out = _run(bench, capsys)
        assert "8 ok, 0 failed" in out and "$ per 1M output tokens" in out
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_policy_example_says_what_a_json_schema_does():
    from tritium.serve.policy import Policy

    policy = _readme_block("yaml", "# policy.yaml")
    assert "json_schema" not in policy  # the example that works with any model enforces no JSON
    schema_example = _readme_block("yaml", "output:\n  json_schema")
    assert "every" in README.read_text().split(schema_example)[0][-400:]  # ... and the text says what it enforces
    import yaml

    Policy.from_dict(yaml.safe_load(policy))  # both parse as policies
    Policy.from_dict(yaml.safe_load(schema_example))


def test_readme_resume_example_continues_the_run_its_config_names():
    import yaml

    run_yaml = yaml.safe_load(_readme_block("yaml", "# run.yaml"))
    yaml_out = run_yaml["out"]
    for argv in COMMANDS:
        if argv[:1] == ["train"] and "--resume" in argv and "--config" in argv:
            after = argv[argv.index("--resume") + 1:]
            if after and not after[0].startswith("--"):
                assert after[0].startswith(f"{yaml_out}/checkpoints/"), (
                    f"`--resume {after[0]}` is not a checkpoint of {yaml_out} (run.yaml's out)")
                step = int(after[0].rsplit("_", 1)[1])
                assert step % run_yaml["save_interval"] == 0


def test_readme_training_examples_use_distinct_run_folders():
    # the single-machine and alignment walk-throughs (the launcher and multi-node examples show one run
    # three ways, so they share a folder on purpose)
    outs = [argv[argv.index("--out") + 1] for argv in COMMANDS
            if (argv[0] in ("sft", "dpo") or argv[:3] == ["train", "--preset", "tiny"]) and "--out" in argv
            and "--resume" not in argv]
    duplicated = sorted({o for o in outs if outs.count(o) > 1})
    assert not duplicated, f"README examples write the same run folder twice (refused now): {duplicated}"
