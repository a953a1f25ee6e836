"""End to end on a toy checkpoint: tritium sft -> tritium dpo -> tritium align-eval, on the shared loop."""
from __future__ import annotations

import json

import pytest
import torch

from tritium.cli import main
from tritium.model.config import ModelConfig
from tritium.model.tokenizer import Tokenizer
from tritium.model.transformer import Transformer


@pytest.fixture
def toy_checkpoint(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128, vocab_size=2048,
                      max_seq_len=128, tie_embeddings=True, backend="sdpa")
    out = tmp_path / "pretrain" / "final"
    Transformer(cfg).save_pretrained(out)
    Tokenizer.load(tiny_tokenizer_dir).save(out)
    return out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sft_then_dpo_then_eval(tmp_path, toy_checkpoint):
    common = ["--seq-len", "128", "--micro-batch", "2", "--per-task", "20", "--log-interval", "1",
              "--no-progress", "--zero-stage", "1"]
    sft_dir = tmp_path / "sft"
    assert main(["sft", "--checkpoint", str(toy_checkpoint), "--out", str(sft_dir), "--max-steps", "4",
                 "--eval-interval", "4", "--lr", "3e-3", *common]) == 0
    records = _records(sft_dir)
    assert records[-1]["step"] == 4 and "val_loss" in records[-1]
    assert (sft_dir / "final" / "model.safetensors").is_file() and (sft_dir / "final" / "tokenizer.model").is_file()
    config = json.loads((sft_dir / "config.json").read_text())
    assert config["sft"]["packing"] is True and config["train"]["init_from"] == str(toy_checkpoint)

    dpo_dir = tmp_path / "dpo"
    assert main(["dpo", "--checkpoint", str(sft_dir / "final"), "--out", str(dpo_dir), "--max-steps", "2",
                 "--eval-interval", "2", "--beta", "0.2", *common]) == 0
    assert (dpo_dir / "reference_logps.pt").is_file()
    # the default recipe anchors the chosen reply (RPO): plain DPO cost exact match on the embedded tasks
    assert json.loads((dpo_dir / "config.json").read_text())["preference"]["sft_weight"] == 2.0
    last = _records(dpo_dir)[-1]
    assert {"reward_accuracy", "reward_margin", "kl", "logps_chosen", "logps_rejected"} <= set(last)

    eval_dir = tmp_path / "eval"
    assert main(["align-eval", "--checkpoint", str(toy_checkpoint), str(sft_dir / "final"), str(dpo_dir / "final"),
                 "--out", str(eval_dir), "--labels", "pretrain,sft", "dpo", "--per-task", "20", "--max-examples", "6", "--max-pairs", "6",
                 "--max-tokens", "4", "--reference-checkpoint", str(sft_dir / "final")]) == 0
    rows = json.loads((eval_dir / "align_eval.json").read_text())
    assert [r["label"] for r in rows] == ["pretrain", "sft", "dpo"]
    for row in rows:
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["format"] <= 1 and row["num_pairs"] == 6
    assert rows[1]["reward_accuracy_vs_ref"] == 0 and rows[1]["reward_margin_vs_ref"] == 0  # sft is the reference
    assert (eval_dir / "align_eval.png").stat().st_size > 0
    assert (eval_dir / "table.md").read_text().count("\n") == 5  # header, rule, three checkpoints


def test_cli_user_errors(tmp_path, toy_checkpoint, capsys):
    assert main(["sft", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "must hold config.json" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    assert main(["sft", "--checkpoint", str(toy_checkpoint), "--out", str(tmp_path / "y"), "--data", str(bad),
                 "--max-steps", "1", "--no-progress"]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
