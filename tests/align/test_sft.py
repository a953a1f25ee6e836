"""SFT: label shifting and packing layout, packed == unpacked, truncation counts, the loss falls."""
from __future__ import annotations

import pytest
import torch

from tritium.align.sft import (
    IGNORE_INDEX,
    SFTBatches,
    collate_padded,
    collate_rows,
    pack_rows,
    sft_loss,
    shifted_labels,
    tokenize_conversations,
)
from tritium.align.tasks import make_splits, sft_conversations
from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer


def small_model(vocab_size: int, seed: int = 0, backend: str = "torch") -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=96,
                      vocab_size=vocab_size, max_seq_len=128, tie_embeddings=True, backend=backend)
    return Transformer(cfg)


def test_shifted_labels_positions():
    ids, mask = [10, 11, 12, 13, 14], [0, 0, 1, 1, 0]
    assert shifted_labels(ids, mask) == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX]


def test_pack_rows_layout(char_tokenizer):
    a = ([1, 5, 6, 7], [0, 0, 1, 1])
    b = ([1, 8, 9], [0, 1, 1])
    c = ([1, 20, 21, 22, 23], [0, 0, 0, 1, 1])
    rows = pack_rows([a, b, c], seq_len=8, pad_id=0)
    assert len(rows) == 2
    first = rows[0]
    assert first["input_ids"] == [1, 5, 6, 7, 1, 8, 9, 0]
    # example a's last token never predicts b's first token
    assert first["labels"] == [-100, 6, 7, -100, 8, 9, -100, -100]
    assert first["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    batch = collate_rows(rows)
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 8, 13, 16]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["input_ids"].shape == (2, 8)
    assert len(pack_rows([a, b, c], seq_len=8, pad_id=0, packing=False)) == 3


def test_truncation_policy_counts_and_warns(char_tokenizer):
    convs = [[{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xyz" * 5}],
             [{"role": "user", "content": "q" * 20}, {"role": "assistant", "content": "z"}],
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    with pytest.warns(UserWarning, match="2 example\\(s\\) truncated.*1 dropped with no completion"):
        examples, stats = tokenize_conversations(char_tokenizer, convs, seq_len=12, truncation="right")
    assert (stats.kept, stats.truncated, stats.dropped_no_target) == (2, 2, 1)
    assert all(len(ids) <= 12 for ids, _ in examples)
    with pytest.warns(UserWarning, match="2 dropped as too long"):
        examples, stats = tokenize_conversations(char_tokenizer, convs, seq_len=12, truncation="drop")
    assert stats.kept == 1
    with pytest.raises(ValueError, match="truncation"):
        tokenize_conversations(char_tokenizer, convs, seq_len=12, truncation="left")


def test_packed_equals_unpacked(char_tokenizer):
    """Same per-example losses and gradients whether examples share a row (cu_seqlens) or not."""
    convs = sft_conversations(make_splits(seed=1, per_task=12)["train"][:7])
    examples, _ = tokenize_conversations(char_tokenizer, convs, seq_len=64)
    model = small_model(char_tokenizer.vocab_size)

    packed = collate_rows(pack_rows(examples, seq_len=64, pad_id=0))
    assert packed["input_ids"].shape[0] < len(examples)  # several examples really share a row
    padded = collate_padded(examples, pad_id=0)

    def total_nll(batch):
        model.zero_grad()
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seqlens") if k in batch}
        nll = model(**inputs, labels=batch["labels"], loss_reduction="none")
        nll.sum().backward()
        return nll, [p.grad.clone() for p in model.parameters()]

    nll_packed, grads_packed = total_nll(packed)
    nll_padded, grads_padded = total_nll(padded)
    # compare per-target-token NLL in order of appearance
    flat_packed = nll_packed[packed["labels"] != IGNORE_INDEX]
    flat_padded = nll_padded[padded["labels"] != IGNORE_INDEX]
    torch.testing.assert_close(flat_packed, flat_padded, rtol=1e-5, atol=1e-5)
    for gp, gu in zip(grads_packed, grads_padded):
        torch.testing.assert_close(gp, gu, rtol=1e-4, atol=1e-5)


def test_batches_are_deterministic_resumable_and_rank_disjoint(char_tokenizer):
    convs = sft_conversations(make_splits(seed=0, per_task=20)["train"])
    examples, _ = tokenize_conversations(char_tokenizer, convs, seq_len=48)
    source = SFTBatches(examples, seq_len=48, pad_id=0, micro_batch=2, seed=5)
    stream = source(0)
    first = [next(stream) for _ in range(5)]
    resumed = source(3)
    for expected in first[3:]:
        assert torch.equal(next(resumed)["input_ids"], expected["input_ids"])
    rank0 = [b["input_ids"] for b, _ in zip(source(0, rank=0, world=2), range(3))]
    rank1 = [b["input_ids"] for b, _ in zip(source(0, rank=1, world=2), range(3))]
    assert all(not torch.equal(x, y) for x, y in zip(rank0, rank1))


def test_short_sft_run_lowers_validation_loss(char_tokenizer):
    splits = make_splits(seed=0, per_task=40)
    train, _ = tokenize_conversations(char_tokenizer, sft_conversations(splits["train"]), seq_len=96)
    val, _ = tokenize_conversations(char_tokenizer, sft_conversations(splits["val"]), seq_len=96)
    model = small_model(char_tokenizer.vocab_size, seed=1, backend="sdpa")  # sdpa: the fast CPU path
    val_batch = collate_rows(pack_rows(val, seq_len=96, pad_id=0))

    def val_loss():
        with torch.no_grad():
            return sft_loss(model, val_batch)[0].item()

    before = val_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = SFTBatches(train, seq_len=96, pad_id=0, micro_batch=4, seed=0)()
    for _ in range(30):
        loss, metrics = sft_loss(model, next(stream))
        assert metrics["target_tokens"] > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = val_loss()
    assert after < 0.7 * before, (before, after)
