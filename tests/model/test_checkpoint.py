"""Checkpoints: our round trip, Hugging Face both ways, sharding, atomic saves, and every error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritium.model.checkpoint import (
    CheckpointError,
    parse_size,
    permute_qk_for_hf,
    save_pretrained,
    unpermute_qk_from_hf,
)
from tritium.model.config import ModelConfig
from tritium.model.transformer import Transformer


def tiny(**overrides):
    dials = {"num_layers": 2, "max_seq_len": 64}
    dials.update(overrides)
    return ModelConfig.from_name("tiny", **dials)


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides), backend="torch")


@pytest.fixture
def ids():
    torch.manual_seed(11)
    return torch.randint(0, 2048, (2, 17))


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_same_logits(tmp_path, ids, tie):
    model = build(tie_embeddings=tie)
    out = model.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["checksums.sha256", "config.json", "model.safetensors"]
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie
    loaded = Transformer.from_pretrained(out, backend="torch")
    assert loaded.config == model.config
    assert (loaded.lm_head_weight is loaded.embed_tokens.weight) is tie
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    half = Transformer.from_pretrained(out, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_sharded_save_with_index_and_atomic_replace(tmp_path, ids):
    model = build(tie_embeddings=False)
    target = tmp_path / "ck"
    target.mkdir()
    (target / "tokenizer.model").write_bytes(b"keep me")
    (target / "model.safetensors").write_bytes(b"stale single-file weights from an earlier save")
    save_pretrained(model, target, max_shard_size="400KB")
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((target / s).is_file() for s in shards)
    assert not (target / "model.safetensors").exists()  # the stale file would shadow nothing but confuse readers
    assert (target / "tokenizer.model").read_bytes() == b"keep me"
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    torch.testing.assert_close(Transformer.from_pretrained(target, backend="torch")(ids), model(ids), atol=0, rtol=0)
    # Saving again unsharded removes the old shards and the index.
    save_pretrained(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["checksums.sha256", "config.json", "model.safetensors",
                                                        "tokenizer.model"]


def test_gelu_model_round_trips_with_native_config(tmp_path, ids):
    model = build(ffn_type="gelu")
    model.save_pretrained(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["ffn_type"] == "gelu"
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path / "ck", backend="torch")(ids), model(ids), atol=0, rtol=0)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# --------------------------------------------------------------------------- Hugging Face
def _hf_tiny_config(transformers, tie):
    return transformers.LlamaConfig(
        hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, vocab_size=300, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie)


@pytest.mark.hf
@pytest.mark.parametrize("tie", [False, True])
def test_hf_checkpoint_loads_here_with_same_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(12)
    hf = transformers.LlamaForCausalLM(_hf_tiny_config(transformers, tie)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf", backend="torch")
    assert ours.config.rope_theta == 50000.0 and ours.config.num_kv_heads == 2 and ours.config.tie_embeddings is tie
    ids = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("tie", [False, True])
def test_our_checkpoint_loads_in_hf_with_same_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    model = build(seed=13, tie_embeddings=tie, rope_theta=500000.0)
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 2048, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-4)


@pytest.mark.hf
def test_hf_rope_scaling_survives_config_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny(rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config.save_pretrained(tmp_path)  # transformers 5 writes rope_parameters, not rope_scaling
    back = ModelConfig.from_json(tmp_path / "config.json")
    assert back.rope_scaling == {"rope_type": "linear", "factor": 2.0} and back.rope_theta == config.rope_theta


def test_meta_layout_permutation_matches_rotate_half():
    """Meta rotates interleaved pairs (complex RoPE); HF rotate_half needs wq/wk permuted per head."""
    torch.manual_seed(14)
    heads, D, H, T = 3, 8, 24, 5
    wq, wk, x = torch.randn(heads * D, H), torch.randn(heads * D, H), torch.randn(T, H)
    freqs = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))  # (T, D/2)

    def meta_rope(y):  # (T, heads, D) interleaved pairs as complex numbers
        z = torch.view_as_complex(y.reshape(T, heads, D // 2, 2)) * torch.polar(torch.ones_like(freqs), freqs)[:, None]
        return torch.view_as_real(z).reshape(T, heads, D)

    def hf_rope(y):
        cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
        return y * cos + torch.cat([-y[..., D // 2:], y[..., :D // 2]], -1) * sin

    def scores(rope, q_w, k_w):
        q, k = rope((x @ q_w.t()).view(T, heads, D)), rope((x @ k_w.t()).view(T, heads, D))
        return torch.einsum("thd,shd->hts", q, k)

    meta = scores(meta_rope, wq, wk)
    hf = scores(hf_rope, permute_qk_for_hf(wq, heads), permute_qk_for_hf(wk, heads))
    torch.testing.assert_close(hf, meta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unpermute_qk_from_hf(permute_qk_for_hf(wq, heads), heads), wq)


# --------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    model = build(tie_embeddings=False)
    return model.save_pretrained(tmp_path / "ck")


def _rewrite(saved, edit):
    """Edit the weights as another tool would: no checksum file, so the loader's own checks answer."""
    tensors = load_file(saved / "model.safetensors")
    edit(tensors)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    (saved / "checksums.sha256").unlink()


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.randn(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        Transformer.from_pretrained(saved)


def test_misshaped_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.norm.weight", torch.randn(191)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(191,\).*\(192,\)"):
        Transformer.from_pretrained(saved)


def test_config_mismatch(saved):
    with pytest.raises(CheckpointError, match="num_layers: given 3, saved 2"):
        Transformer.from_pretrained(saved, config=tiny(num_layers=3, tie_embeddings=False))
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 256
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp.*shape.*config"):
        Transformer.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_or_truncated_file_is_named(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 8 + data[8:],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(saved)


def _flip_middle(path, count=16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_fail_the_checksum_with_one_line(saved, monkeypatch):
    """Issue 16.9: XOR 0xFF over 16 bytes in the middle of model.safetensors used to load silently."""
    from tritium.model.checkpoint import VERIFY_ENV, file_sha256, load_pretrained, verify_checksums

    # cloned: safetensors may map the file, and the flip below rewrites it in place
    reference = {k: v.clone() for k, v in Transformer.from_pretrained(saved).state_dict().items()}
    listed = dict(line.split()[::-1] for line in (saved / "checksums.sha256").read_text().splitlines())
    assert listed == {"model.safetensors": file_sha256(saved / "model.safetensors")}
    assert verify_checksums(saved) is True
    _flip_middle(saved / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        Transformer.from_pretrained(saved)
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message and "SHA-256" in message
    assert VERIFY_ENV in message  # the way out for files changed on purpose
    # opt-out: the kwarg, or the environment for any command; the flipped bytes then load (and differ)
    changed = load_pretrained(saved, verify=False)
    monkeypatch.setenv(VERIFY_ENV, "0")
    for model in (changed, Transformer.from_pretrained(saved)):
        differing = [k for k, v in model.state_dict().items() if not torch.equal(v, reference[k])]
        assert len(differing) == 1


def test_generate_and_serve_refuse_flipped_bytes_unless_told(saved, tiny_tokenizer_dir):
    """The command line's opt-out: --no-verify-checksums on generate and serve (the error names it)."""
    import shutil

    from tritium.cli import build_parser
    from tritium.serve.cli_generate import load_for_inference

    shutil.copy(tiny_tokenizer_dir / "tokenizer.model", saved / "tokenizer.model")
    _flip_middle(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="--no-verify-checksums"):
        load_for_inference(saved, device="cpu")
    parser = build_parser()
    for command in (["generate", "--checkpoint", str(saved), "hi"], ["serve", "--checkpoint", str(saved)]):
        assert parser.parse_args(command).verify_checksums is None  # default: verify
        args = parser.parse_args(command + ["--no-verify-checksums"])
        assert args.verify_checksums is False
    model, _ = load_for_inference(saved, device="cpu", verify=args.verify_checksums)
    assert model.config.vocab_size > 0


def test_checksums_cover_shards_and_folders_without_them_load(tmp_path, ids):
    model = build(tie_embeddings=False)
    target = save_pretrained(model, tmp_path / "sharded", max_shard_size="400KB")
    listed = [line.split()[1] for line in (target / "checksums.sha256").read_text().splitlines()]
    assert "model.safetensors.index.json" in listed and len(listed) > 3
    shard = target / sorted(name for name in listed if name.endswith(".safetensors"))[1]
    _flip_middle(shard, count=4)
    with pytest.raises(CheckpointError, match=shard.name):
        Transformer.from_pretrained(target)
    # a folder made elsewhere (no checksums.sha256) loads as before
    plain = save_pretrained(model, tmp_path / "plain")
    (plain / "checksums.sha256").unlink()
    torch.testing.assert_close(Transformer.from_pretrained(plain, backend="torch")(ids), model(ids), atol=0, rtol=0)


def test_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(saved)
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "x.safetensors"}}))
    with pytest.raises(CheckpointError, match="x.safetensors"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(saved)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_legacy_bin_loads_with_weights_only_and_refuses_code(saved, ids):
    reference = Transformer.from_pretrained(saved)
    state = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")
    torch.testing.assert_close(Transformer.from_pretrained(saved)(ids), reference(ids), atol=0, rtol=0)
    torch.save({"model.norm.weight": _Exploit()}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only"):
        Transformer.from_pretrained(saved)


def test_cannot_save_meta_model(tmp_path):
    with torch.device("meta"):
        model = Transformer(tiny())
    with pytest.raises(CheckpointError, match="meta"):
        model.save_pretrained(tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
