"""The model itself: shapes, loss conventions, KV cache, varlen packing, checkpointing, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from tritium.model.config import ModelConfig
from tritium.model.transformer import LMHead, Transformer, zero3_external_params


def tiny(**overrides):
    dials = {"num_layers": 2, "max_seq_len": 64}
    dials.update(overrides)
    return ModelConfig.from_name("tiny", **dials)


def build(seed=0, backend="torch", **overrides):
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides), backend=backend)


class ContiguousCache:
    """Test-only KV cache: (B, S_max, Hkv, D) per layer; ``attend`` writes at ``length`` and attends."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.length = 0

    def attend(self, layer_idx, q, k, v):
        T = q.shape[1]
        end = self.length + T
        self.k[layer_idx][:, self.length:end] = k
        self.v[layer_idx][:, self.length:end] = v
        keys, values = self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]
        group = q.shape[2] // k.shape[2]
        keys, values = keys.repeat_interleave(group, 2), values.repeat_interleave(group, 2)
        scores = torch.einsum("bthd,bshd->bhts", q, keys) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, end, dtype=torch.bool).tril(self.length)  # bottom-right aligned causal
        return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~mask, -math.inf).softmax(-1), values)


def test_meta_construction_counts_presets_without_memory():
    with torch.device("meta"):
        llama2 = Transformer(ModelConfig.from_name("llama2-7b"))
        seed = Transformer(ModelConfig.from_name("seed-7b"))
    assert llama2.num_parameters() == 6_738_415_616
    assert all(p.is_meta for p in llama2.parameters())
    # seed-7b: two-matrix GELU FFN, 4x wide, untied 32000-token embedding and head.
    per_layer = 4 * 4096 * 4096 + 2 * 4096 * 16384 + 2 * 4096
    assert seed.num_parameters() == 32 * per_layer + 2 * 32000 * 4096 + 4096
    assert not hasattr(seed.layers[0].mlp, "gate_proj")


def test_init_scales_residual_projections():
    model = build(num_layers=4)
    std = model.config.initializer_range
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    for w in (model.layers[1].self_attn.o_proj.weight, model.layers[2].mlp.down_proj.weight):
        assert w.std().item() == pytest.approx(std / math.sqrt(2 * 4), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_tied_and_untied_heads():
    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head_weight is tied.embed_tokens.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert zero3_external_params(tied) == [(tied.lm_head, tied.embed_tokens.weight)]
    assert untied.lm_head_weight is untied.lm_head.weight and zero3_external_params(untied) == []
    # Tying survives a meta -> real materialisation.
    with torch.device("meta"):
        meta = Transformer(tiny())
    meta.to_empty(device="cpu")
    assert meta.lm_head_weight is meta.embed_tokens.weight


def test_logits_and_loss_conventions():
    model = build()
    torch.manual_seed(1)
    ids = torch.randint(0, 2048, (2, 13))
    labels = torch.randint(0, 2048, (2, 13))
    labels[0, :4] = -100
    logits = model(ids)
    assert logits.shape == (2, 13, 2048)
    hidden = model.forward_hidden(ids)
    torch.testing.assert_close(logits, hidden @ model.lm_head_weight.t())
    # Labels are used as given (pre-shifted): no shift inside the model.
    expected = F.cross_entropy(logits.reshape(-1, 2048), labels.reshape(-1), reduction="none").view(2, 13)
    per_token = model(ids, labels=labels, loss_reduction="none")
    assert per_token.shape == (2, 13)
    torch.testing.assert_close(per_token, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(per_token[0, :4] == 0)
    torch.testing.assert_close(model(ids, labels=labels), expected.sum() / (labels != -100).sum())
    torch.testing.assert_close(model(ids, labels=labels, loss_reduction="sum"), expected.sum())


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_kv_cache_prefill_then_decode_matches_full_sequence(backend):
    model = build(backend=backend, tie_embeddings=False).eval()
    torch.manual_seed(2)
    B, T, prefill = 2, 11, 6
    ids = torch.randint(0, 2048, (B, T))
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousCache(model.config, B, T)
        pos = torch.arange(T).expand(B, T)
        steps = [model(ids[:, :prefill], position_ids=pos[:, :prefill], kv_cache=cache)]
        cache.length = prefill
        for t in range(prefill, T):
            steps.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], kv_cache=cache))
            cache.length += 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_varlen_packed_batch_equals_separate_sequences(backend):
    model = build(backend=backend)
    torch.manual_seed(3)
    lengths = [5, 1, 9, 4]
    docs = [torch.randint(0, 2048, (1, n)) for n in lengths]
    cu_seqlens = torch.tensor([0, 5, 6, 15, 19], dtype=torch.int32)
    packed = torch.cat(docs, dim=1)
    labels = torch.randint(0, 2048, packed.shape)
    logits = model(packed, cu_seqlens=cu_seqlens)
    separate = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(logits, separate, atol=1e-5, rtol=1e-4)
    # The per-token loss of the packed batch is the per-document losses side by side.
    nll = model(packed, labels=labels, cu_seqlens=cu_seqlens, loss_reduction="none")
    split = torch.split(labels, lengths, dim=1)
    expected = torch.cat([model(d, labels=y, loss_reduction="none") for d, y in zip(docs, split)], dim=1)
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-4)
    # B > 1: cu_seqlens index the flattened B*T tokens.
    two_rows = torch.cat(docs[:2] + docs[3:], dim=1).view(2, 5)
    out = model(two_rows, cu_seqlens=torch.tensor([0, 5, 6, 10], dtype=torch.int32))
    torch.testing.assert_close(out[1, 1:], model(docs[3])[0], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    ids, labels = torch.randint(0, 2048, (2, 9)), torch.randint(0, 2048, (2, 9))
    grads = []
    for flag in (False, True):
        model = build(seed=5)
        model.gradient_checkpointing = flag
        model(ids, labels=labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_bf16_forward_runs_and_stays_close():
    model = build()
    torch.manual_seed(6)
    ids = torch.randint(0, 2048, (1, 12))
    ref = model(ids)
    low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_training_smoke_loss_falls():
    torch.manual_seed(7)
    model = Transformer(tiny(num_layers=2, vocab_size=64, hidden_size=64, num_heads=4, num_kv_heads=2,
                             head_dim=16, ffn_hidden=128), backend="torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    motifs = torch.randint(0, 64, (4, 8))  # structured data: each row repeats one random motif
    losses = []
    for step in range(50):
        rows = motifs[torch.randint(0, 4, (4,))].repeat(1, 3)  # (4, 24)
        ids, labels = rows[:, :-1], rows[:, 1:]
        loss = model(ids, labels=labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(64) - 0.5
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_lm_head_is_the_loss_owner():
    model = build(tie_embeddings=False)
    assert isinstance(model.lm_head, LMHead)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(module))
    model(torch.randint(0, 2048, (1, 5)), labels=torch.randint(0, 2048, (1, 5)))
    assert seen == [model.lm_head]


def test_error_messages():
    model = build()
    ids = torch.randint(0, 2048, (1, 8))
    with pytest.raises(ValueError, match="loss_reduction"):
        model(ids, labels=ids, loss_reduction="avg")
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 2048, (1, 65)))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, kv_cache=ContiguousCache(model.config, 1, 8))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="backend"):
        Transformer(tiny(), backend="cuda-magic")


def test_torch_backend_compiles_without_graph_breaks():
    model = build(num_layers=1)
    ids, labels = torch.randint(0, 2048, (2, 9)), torch.randint(0, 2048, (2, 9))
    expected = model(ids, labels=labels)  # the eager call also caches the resolved backend
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo only: no C++ toolchain needed
    torch.testing.assert_close(compiled(ids, labels=labels), expected)
