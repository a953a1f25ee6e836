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
    code, out, _ = run_cli(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "340",
                           "--out", str(tmp_path / "tok"))
    assert code == 0 and "340-token" in out and (tmp_path / "tok" / "tokenizer.model").is_file()

    code, out, _ = run_cli(capsys, "tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "  the cat\n")
    ids = out.split()
    code, out, _ = run_cli(capsys, "tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), *ids)
    assert code == 0 and out == "  the cat\n\n"

    code, out, _ = run_cli(capsys, "data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(corpus),
                           "--out", str(tmp_path / "data"), "--val-fraction", "0.25")
    assert code == 0 and "validation" in out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["validation"]["docs"] == 12
    code, out, _ = run_cli(capsys, "data", "info", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok"),
                           "--seq-len", "16")
    assert code == 0 and "tokenizer matches" in out

    # another tokenizer: a one-line mismatch error, exit 2
    run_cli(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "330", "--out", str(tmp_path / "t2"))
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
