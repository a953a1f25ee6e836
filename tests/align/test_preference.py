"""DPO / cDPO / IPO / SimPO against hand-computed references; log-probs; the frozen reference model."""
from __future__ import annotations

import math

import pytest
import torch

from tritium.align.data import PreferencePair
from tritium.align.preference import (
    PreferenceBatches,
    PreferenceConfig,
    ReferenceModel,
    collate_pairs,
    compute_reference_logps,
    make_preference_loss,
    preference_loss,
    sequence_logps,
    tokenize_pairs,
)
from tritium.align.tasks import make_splits, preference_pairs
from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_reference(pc, pr, rc, rr, lc, lr, loss, beta, eps, gamma):
    """Per-pair (loss, dloss/dpc, dloss/dpr) in plain floats, derived by hand."""
    if loss == "simpo":
        z = beta * (pc / lc - pr / lr) - gamma
        value = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
        dz = -(1 - eps) * _sig(-z) + eps * _sig(z)  # d value / d z
        return value, dz * beta / lc, -dz * beta / lr
    gap = (pc - rc) - (pr - rr)
    if loss == "dpo":
        z = beta * gap
        value = -(1 - eps) * _logsig(z) - eps * _logsig(-z)
        dz = -(1 - eps) * _sig(-z) + eps * _sig(z)
        return value, dz * beta, -dz * beta
    value = (gap - 1 / (2 * beta)) ** 2  # ipo
    return value, 2 * (gap - 1 / (2 * beta)), -2 * (gap - 1 / (2 * beta))


@pytest.mark.parametrize("loss, beta, eps, gamma", [
    ("dpo", 0.1, 0.0, 0.0), ("dpo", 0.5, 0.2, 0.0), ("ipo", 0.1, 0.0, 0.0), ("ipo", 1.3, 0.0, 0.0),
    ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.5, 0.1, 1.0)])
def test_losses_and_gradients_match_hand_computation(loss, beta, eps, gamma):
    gen = torch.Generator().manual_seed(7)
    B = 5
    pc = (-20 * torch.rand(B, generator=gen, dtype=torch.float64) - 1).requires_grad_()
    pr = (-20 * torch.rand(B, generator=gen, dtype=torch.float64) - 1).requires_grad_()
    rc = -20 * torch.rand(B, generator=gen, dtype=torch.float64) - 1
    rr = -20 * torch.rand(B, generator=gen, dtype=torch.float64) - 1
    lc = torch.randint(1, 9, (B,), generator=gen)
    lr = torch.randint(1, 9, (B,), generator=gen)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, None if loss == "simpo" else rc, None if loss == "simpo" else rr, lc, lr, loss=loss, beta=beta,
        label_smoothing=eps, gamma=gamma)
    losses.sum().backward()
    for i in range(B):
        value, d_pc, d_pr = hand_reference(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), lc[i].item(),
                                           lr[i].item(), loss, beta, eps, gamma)
        assert losses[i].item() == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert pc.grad[i].item() == pytest.approx(d_pc, rel=1e-9, abs=1e-12)
        assert pr.grad[i].item() == pytest.approx(d_pr, rel=1e-9, abs=1e-12)
        if loss == "simpo":
            assert chosen_rewards[i].item() == pytest.approx(beta * pc[i].item() / lc[i].item())
        else:
            assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()))
            assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()))


def test_config_validation():
    with pytest.raises(ValueError, match="loss"):
        PreferenceConfig(loss="kto")
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference"):
        PreferenceConfig(loss="dpo", reference="none")
    assert PreferenceConfig(loss="simpo").reference == "none"


def tiny_policy(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=96,
                      vocab_size=vocab_size, max_seq_len=64, tie_embeddings=True, backend="torch")
    return Transformer(cfg)


@pytest.fixture
def pairs(char_tokenizer):
    raw = preference_pairs(make_splits(seed=0, per_task=12)["train"][:6], seed=0)
    tokenized, dropped = tokenize_pairs(char_tokenizer, raw, max_len=64)
    assert dropped == 0
    return raw, tokenized


def test_pair_mask_covers_only_the_final_reply(char_tokenizer):
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "old"},
              {"role": "user", "content": "b"}]
    (pair,), _ = tokenize_pairs(char_tokenizer, [PreferencePair(prompt, "yes", "no")], max_len=64)
    ids, mask = pair.chosen
    assert [i for i, m in enumerate(mask) if m] == list(range(len(ids) - 4, len(ids)))  # "yes" + <|end|>
    assert ids[-1] == char_tokenizer.end_of_turn_id and char_tokenizer.decode(ids[-4:-1]) == "yes"


def test_sequence_logps_one_forward_matches_log_softmax(char_tokenizer, pairs):
    _, tokenized = pairs
    model = tiny_policy(char_tokenizer.vocab_size)
    batch = collate_pairs(tokenized[:3], pad_id=0)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    logps, lengths = sequence_logps(model, batch)
    assert len(calls) == 1 and logps.shape == (6,)  # chosen and rejected rows in ONE forward
    with torch.no_grad():
        logits = model(batch["input_ids"]).float().log_softmax(-1)
    for row in range(6):
        keep = batch["labels"][row] != -100
        expected = logits[row][keep].gather(-1, batch["labels"][row][keep][:, None]).sum()
        assert logps[row].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4)
        assert lengths[row].item() == int(keep.sum())


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_reference_gets_no_grads_and_never_changes(char_tokenizer, pairs, loss):
    _, tokenized = pairs
    policy = tiny_policy(char_tokenizer.vocab_size, seed=3)
    reference = ReferenceModel.copy_of(policy)
    snapshot = {k: v.clone() for k, v in reference.model.state_dict().items()}
    cfg = PreferenceConfig(loss=loss, beta=0.5 if loss != "simpo" else 2.0, reference="model")
    loss_fn = make_preference_loss(cfg, reference=None if loss == "simpo" else reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stream = PreferenceBatches(tokenized, pad_id=0, micro_batch=3)()
    first = None
    for step in range(6):
        batch = next(stream) if step else collate_pairs(tokenized, pad_id=0)
        value, metrics = loss_fn(policy, batch)
        first = first if first is not None else value.item()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert not reference.model.training
    assert all(p.grad is None and not p.requires_grad for p in reference.model.parameters())
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert any(not torch.equal(p, snapshot[k]) for k, p in policy.state_dict().items())
    final, metrics = loss_fn(policy, collate_pairs(tokenized, pad_id=0))
    assert final.item() < first
    assert set(metrics) >= {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"}
    assert ("kl" in metrics) == (loss != "simpo")


def test_cached_reference_logps_equal_the_frozen_model(char_tokenizer, pairs):
    _, tokenized = pairs
    policy = tiny_policy(char_tokenizer.vocab_size, seed=4)
    cached = compute_reference_logps(policy, tokenized, pad_id=0, micro_batch=4)
    reference = ReferenceModel.copy_of(policy)
    cfg = PreferenceConfig(loss="dpo", beta=0.1)
    batch_cached = collate_pairs(tokenized, pad_id=0, reference_logps=cached)
    batch_plain = collate_pairs(tokenized, pad_id=0)
    loss_cached, m_cached = make_preference_loss(cfg)(policy, batch_cached)
    loss_model, _ = make_preference_loss(cfg, reference)(policy, batch_plain)
    # the policy equals the reference at the start: the DPO loss is log 2, the KL estimate 0
    assert loss_cached.item() == pytest.approx(math.log(2), abs=1e-5)
    assert loss_model.item() == pytest.approx(loss_cached.item(), abs=1e-6)
    assert abs(float(m_cached["kl"])) < 1e-4
    with pytest.raises(ValueError, match="reference"):
        make_preference_loss(cfg)(policy, batch_plain)


def test_sft_weight_adds_the_chosen_mean_nll(char_tokenizer, pairs):
    _, tokenized = pairs
    policy = tiny_policy(char_tokenizer.vocab_size, seed=5)
    batch = collate_pairs(tokenized, pad_id=0, reference_logps=compute_reference_logps(policy, tokenized, 0))
    plain, _ = make_preference_loss(PreferenceConfig(loss="dpo"))(policy, batch)
    anchored, metrics = make_preference_loss(PreferenceConfig(loss="dpo", sft_weight=0.5))(policy, batch)
    logps, lengths = sequence_logps(policy, batch)
    n = len(tokenized)
    expected_nll = (-(logps[:n] / lengths[:n])).mean()
    assert anchored.item() == pytest.approx(plain.item() + 0.5 * expected_nll.item(), rel=1e-5)
    assert float(metrics["chosen_nll"]) == pytest.approx(expected_nll.item(), rel=1e-5)


def test_eval_preference_scores():
    from tritium.align.evaluate import score_preferences

    gen = torch.Generator().manual_seed(11)
    logps = -10 * torch.rand(9, 2, generator=gen, dtype=torch.float64)
    ref = -10 * torch.rand(9, 2, generator=gen, dtype=torch.float64)
    result = score_preferences(logps, ref)
    gap = [logps[i, 0].item() - logps[i, 1].item() for i in range(9)]
    implicit = [gap[i] - (ref[i, 0].item() - ref[i, 1].item()) for i in range(9)]
    assert result["pref_accuracy"] == pytest.approx(sum(g > 0 for g in gap) / 9)
    assert result["pref_margin"] == pytest.approx(sum(gap) / 9)
    assert result["reward_accuracy_vs_ref"] == pytest.approx(sum(g > 0 for g in implicit) / 9)
    assert result["reward_margin_vs_ref"] == pytest.approx(sum(implicit) / 9)
    with pytest.raises(ValueError, match="tokenizer"):
        score_preferences(logps, ref[:4])
