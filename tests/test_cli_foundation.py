"""`tritium describe`, `tritium tokenizer`, `tritium data` through the real command-line entry point."""
import json
import subprocess
import sys

import pytest

from tritium.cli import main
from tritium.model.config import ModelConfig


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_describe_llama2_7b_table(capsys):
    code, out, _ = run_cli(capsys, "describe", "--preset", "llama2-7b")
    assert code == 0
    assert "6,738,415,616" in out
    for word in ("embeddings", "attention", "ffn", "norms", "head", "ZeRO", "KV cache", "524,288 bytes/token"):
        assert word in out


def test_describe_json_dials_and_cost(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "describe", "--preset", "tiny", "--num-layers", "2", "--no-tie-embeddings",
                           "--gpus", "4", "--micro-batch", "3", "--seq-len", "128", "--json", "--cost",
                           "--requests-per-s", "2", "--tokens-per-s-per-gpu", "500", "--gpu-hour-price", "1")
    assert code == 0
    report = json.loads(out)
    assert report["parameters"]["total"] == 2 * 2048 * 192 + 2 * (98_304 + 3 * 192 * 512) + 5 * 192
    assert report["training_memory"]["num_gpus"] == 4
    n = 3 * 128  # tokens: 2 blocks, final norm + 1/rms, d(hidden) + d(head) of the fused loss, ids, RoPE tables
    assert report["training_memory"]["stages"]["3"]["activations"] == (
        n * (2 * 5664 + 2 * 192 + 4 + 2 * 192 + 8) + 2048 * 192 * 2 + 2 * 256 * 32 * 4)
    assert report["inference_cost"]["decode_tokens_per_s_per_gpu"] == 500
    # a config file (ours or Hugging Face's) describes the same model
    cfg = ModelConfig.from_name("llama3-8b")
    cfg.to_json(tmp_path / "ours.json")
    (tmp_path / "hf.json").write_text(json.dumps(cfg.to_hf_dict()))
    totals = []
    for path in ("ours.json", "hf.json"):
        code, out, _ = run_cli(capsys, "describe", "--config", str(tmp_path / path), "--json")
        totals.append(json.loads(out)["parameters"]["total"])
    assert totals[0] == totals[1] == 8_030_261_248


@pytest.mark.parametrize("argv, message", [
    (["describe", "--hidden-size", "100", "--num-heads", "7"], "does not divide hidden_size"),
    (["describe", "--preset", "tiny", "--num-kv-heads", "4"], "must divide num_heads"),
    (["describe", "--preset", "tiny", "--gpus", "0"], "--gpus"),
    (["describe", "--config", "/no/such/config.json"], "not found"),
])
def test_describe_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_input_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "tritium", "describe", "--hidden-size", "100", "--num-heads", "7"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("tritium describe: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tokenizer_and_data_commands(capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the cat sat on the mat.\n  Indented line {i * 7}.\n" * 20)
    code, out, _ = run_cli(capsys, "tokenizer", "train", "--data", str(corpus), "--vocab-size", "340",
                           "--out", str(tmp_path / "tok"))
    assert code == 0 and "340-token" in out and (tmp_path / "tok" / "tokenizer.model").is_file()

    code, out, _ = run_cli(capsys, "tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "  the cat\n")
    ids = out.split()
    code, out, _ = run_cli(capsys, "tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), *ids)
    assert code == 0 and out == "  the cat\n\n"

    code, out, _ = run_cli(capsys, "data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--data", str(corpus),
                           "--out", str(tmp_path / "data"), "--val-fraction", "0.25")
    assert code == 0 and "validation" in out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["validation"]["docs"] == 12
    code, out, _ = run_cli(capsys, "data", "info", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok"),
                           "--seq-len", "16")
    assert code == 0 and "tokenizer matches" in out

    # another tokenizer: a one-line mismatch error, exit 2
    # the old spelling still works for one release, with a warning naming the new flag
    code, _, err = run_cli(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "330",
                           "--out", str(tmp_path / "t2"))
    assert code == 0 and "--input is deprecated" in err and "use --data" in err
    code, _, err = run_cli(capsys, "data", "info", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "t2"))
    assert code == 2 and "tokenizer mismatch" in err
    code, _, err = run_cli(capsys, "data", "prepare", "--tokenizer", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "d2"))
    assert code == 2 and "tokenizer not found" in err


def test_tokenizer_train_default_corpus_is_quick(capsys, tmp_path):
    import time

    start = time.perf_counter()
    code, out, _ = run_cli(capsys, "tokenizer", "train", "--vocab-size", "2048", "--out", str(tmp_path))
    assert code == 0 and "embedded corpus" in out
    assert time.perf_counter() - start < 30


# ---------------------------------------------------------------------------------------- one vocabulary
def _parse(*argv):
    from tritium.cli import build_parser

    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("old, new, argv, dest, value", [
    ("--input", "--data", ["data", "prepare", "--tokenizer", "t", "--out", "o", "--input", "a.txt"], "data", ["a.txt"]),
    ("--max-bytes", "--corpus-bytes", ["tokenizer", "train", "--out", "o", "--max-bytes", "9"], "corpus_bytes", 9),
    ("--init-from", "--checkpoint", ["train", "--init-from", "ck"], "init_from", "ck"),
    ("--init-from", "--checkpoint", ["sft", "--init-from", "ck"], "init_from", "ck"),
    ("--max-new-tokens", "--max-tokens", ["align-eval", "--checkpoint", "a", "--max-new-tokens", "7"], "max_tokens", 7),
    ("--reference", "--reference-checkpoint", ["align-eval", "--checkpoint", "a", "--reference", "r"],
     "reference_checkpoint", "r"),
    ("--output-tokens", "--max-tokens", ["describe", "--output-tokens", "5"], "max_tokens", 5),
    ("--traffic-rps", "--requests-per-s", ["serve-bench", "--url", "u", "--traffic-rps", "3"], "requests_per_s", 3.0),
])
def test_old_flag_spellings_are_deprecated_aliases(capsys, old, new, argv, dest, value):
    from tritium.flags import RENAMED

    assert RENAMED[old] == new
    args = _parse(*argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and f"use {new}" in err
    new_argv = [new if a == old else a for a in argv]  # the new spelling: same value, no warning
    assert getattr(_parse(*new_argv), dest) == value and "deprecated" not in capsys.readouterr().err


def test_one_name_per_concept_across_commands():
    """No command still offers an old spelling as a visible flag, and sft has one way to name its start."""
    from tritium.cli import build_parser
    from tritium.flags import RENAMED

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        parsers = [sub]
        for action in sub._actions:  # tokenizer/data have sub-actions (train, prepare, ...)
            if isinstance(action, type(parser._subparsers._group_actions[0])):
                parsers += list(action.choices.values())
        for p in parsers:
            visible = {o for a in p._actions if a.help != "==SUPPRESS==" for o in a.option_strings}
            stale = {o for o in visible & set(RENAMED) if not (name == "dpo" and o == "--reference")}
            assert not stale, f"tritium {name} still shows {stale}; rename them (tritium.flags.RENAMED)"
    sft = commands["sft"]
    starts = [a for a in sft._actions if a.dest in ("init_from", "checkpoint") and a.help != "==SUPPRESS=="]
    assert [a.option_strings for a in starts] == [["--checkpoint"]]


def _flags_of(parser, seen=None) -> set[str]:
    import argparse

    flags = set()
    for action in parser._actions:
        if action.help != "==SUPPRESS==" or action.dest == "local_rank":  # deprecated spellings do not count
            flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags_of(sub)
    return flags


def test_every_flag_an_error_message_names_exists():
    """An error that tells the user to pass --some-flag names a flag some command really has."""
    import argparse
    import re
    from pathlib import Path

    from tritium.cli import build_parser
    from tritium.train.cli_train import add_arguments

    rank_parser = argparse.ArgumentParser()
    add_arguments(rank_parser)
    known = _flags_of(build_parser()) | _flags_of(rank_parser)
    root = Path(__file__).resolve().parents[1]
    missing = []
    for folder in ("kernels", "model", "train", "align", "serve", "bench", "tritium"):
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text()
            # string literals inside raise ...(...) / error(...) / print(..., file=sys.stderr) calls
            for call in re.finditer(r"(?:raise \w+\(|Error\(|error\(|warn\w*\()((?:[^()]|\([^()]*\))*)\)",
                                    text, flags=re.S):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", call.group(1)):
                    if flag not in known:
                        missing.append(f"{path.relative_to(root)}: {flag}")
    assert not missing, f"error messages name flags no command has: {sorted(set(missing))}"


# ---------------------------------------------------------------------------------------- run folders
def _fake_checkpoint(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.model").write_text("")
    return path


@pytest.mark.parametrize("command", ["train", "sft", "dpo", "align-eval", "demo"])
def test_an_existing_run_folder_is_refused(capsys, tmp_path, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    ckpt = str(_fake_checkpoint(tmp_path / "ckpt"))
    argv = {"train": ["train", "--preset", "tiny", "--max-steps", "1"],
            "sft": ["sft", "--checkpoint", ckpt], "dpo": ["dpo", "--checkpoint", ckpt],
            "align-eval": ["align-eval", "--checkpoint", ckpt], "demo": ["demo", "--quick"]}[command]
    code, _, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 2, err
    assert f"--out {out} already holds a run" in err and "--overwrite" in err
    assert ("--resume" in err) == (command in ("train", "sft", "dpo"))
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 7.0}\n'  # untouched


def test_overwrite_replaces_only_a_run_folder(tmp_path):
    from tritium.runs import claim_run_folder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    assert claim_run_folder(run, resume=True) == run and (run / "metrics.jsonl").exists()  # --resume continues it
    with pytest.raises(ValueError, match="an input of this run"):
        claim_run_folder(run, overwrite=True, inputs=[run / "checkpoints"])
    claim_run_folder(run, overwrite=True)
    assert not run.exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("")
    with pytest.raises(ValueError, match="does not look like a tritium run folder"):
        claim_run_folder(other, overwrite=True)
    assert (other / "cat.jpg").exists()
    (tmp_path / "empty").mkdir()
    assert claim_run_folder(tmp_path / "empty") == tmp_path / "empty"


def test_a_corpus_too_small_for_the_vocabulary_names_a_train_flag(capsys, tmp_path):
    """`tritium train` has no --vocab-size; its error names the fix that works there."""
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus\n" * 30)
    code, _, err = run_cli(capsys, "train", "--preset", "tiny", "--data", str(small), "--max-steps", "1",
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "--model-override vocab_size=N" in err and "--vocab-size" not in err, err


def test_device_cuda_without_cuda_says_so(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tritium.model.tokenizer import train_tokenizer
    from tritium.model.transformer import Transformer

    cfg = ModelConfig.from_name("tiny", num_layers=1, vocab_size=400, max_seq_len=32)
    Transformer(cfg).save_pretrained(tmp_path / "ckpt")
    train_tokenizer(None, 400, tmp_path / "ckpt", max_bytes=150_000, num_threads=1)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Transformer.from_pretrained(tmp_path / "ckpt", device="cuda")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cuda", "hi")
    assert code == 2 and "CUDA is not available" in err and "--device cpu" in err and "safetensors" not in err, err


def test_skip_malformed_says_how_many_lines_it_skipped(capsys, tmp_path, monkeypatch):
    from tritium.align.data import load_sft_jsonl

    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / "chats.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n{"prompt": 1}\n{"prompt": "c", "completion": "d"}\n')
    records, stats = load_sft_jsonl(path, skip_malformed=True)
    assert len(records) == 2 and stats.skipped == 2
    assert f"{path}: skipped 2 malformed line(s) of 4; 2 kept" in capsys.readouterr().err
