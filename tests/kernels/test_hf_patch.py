"""tritium.kernels.hf.patch on tiny randomly initialised HF models: same logits, loss and grads."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tritium.kernels import hf

VOCAB = 97


def _tiny(arch: str):
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                  "attn_implementation": "eager"}
    torch.manual_seed(0)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=500.0, **common))
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 5), generator=gen)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_patched_model_matches_unpatched(arch, launches):
    ids, labels = _batch()
    reference = _tiny(arch)
    patched = _tiny(arch)
    patched.load_state_dict(reference.state_dict())
    hf.patch(patched)
    for model in (reference, patched):
        model.train()
    ref_out = reference(ids, labels=labels)
    ref_out.loss.backward()
    assert not launches, "the unpatched HF model launched Triton kernels"
    out = patched(ids, labels=labels)
    assert out.logits is None  # training with labels: the fused loss never builds logits
    out.loss.backward()
    launches.require("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                     "_rope_kernel", "_cross_entropy_kernel")
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    ref_grads, grads = _grads(reference), _grads(patched)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    reference.eval()
    patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        eval_out = patched(ids, labels=labels)  # eval mode: logits as well as the fused loss
        torch.testing.assert_close(eval_out.logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_patch_honours_num_items_in_batch_and_switches(launches):
    ids, labels = _batch()
    reference = _tiny("llama")
    patched = _tiny("llama")
    patched.load_state_dict(reference.state_dict())
    hf.patch(patched, rms_norm=False, mlp=True, rope=False, loss=True)
    n_items = torch.tensor(11)
    with torch.no_grad():
        want = reference(ids, labels=labels, num_items_in_batch=n_items).loss
        got = patched(ids, labels=labels, num_items_in_batch=n_items).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    launches.require("_swiglu_fwd_kernel", "_cross_entropy_kernel")
    assert launches["_rms_norm_fwd_kernel"] == 0 and launches["_rope_kernel"] == 0, dict(launches)
    assert "forward" not in vars(patched.model.norm)  # rms_norm=False left HF's forward
    assert "forward" in vars(patched.model.layers[0].mlp)
    assert "forward" not in vars(patched.model.layers[0].self_attn)  # rope=False


def test_rope_patch_only_affects_patched_models():
    from transformers.models.llama import modeling_llama
    hf.patch(_tiny("llama"))
    calls = []
    original_rope = modeling_llama.apply_rotary_pos_emb._tritium_original

    def spy(*args, **kwargs):
        calls.append(1)
        return original_rope(*args, **kwargs)

    modeling_llama.apply_rotary_pos_emb._tritium_original = spy
    try:
        ids, _ = _batch()
        with torch.no_grad():
            _tiny("llama")(ids)  # unpatched model: HF's rotation
            assert len(calls) == 1
            hf.patch(_tiny("llama"))(ids)  # patched: the kernel, not HF's code
            assert len(calls) == 1
    finally:
        modeling_llama.apply_rotary_pos_emb._tritium_original = original_rope


def test_patch_rejects_unsupported_architectures():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        hf.patch(model)
    silu_free = _tiny("llama")
    silu_free.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        hf.patch(silu_free)


def test_import_tritium_kernels_stays_light():
    code = ("import sys, tritium.kernels as k; k.fused_linear_cross_entropy, k.apply_rope, k.rms_norm; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


PUBLIC_FUNCTIONS = ["rms_norm", "swiglu", "swiglu_mlp", "cross_entropy", "fused_linear_cross_entropy", "apply_rope",
                    "rope_cos_sin", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_package_exports_the_callable(name):
    import tritium.kernels as k
    fn = getattr(k, name)
    assert callable(fn) and not isinstance(fn, type(k)), f"tritium.kernels.{name} is {fn!r}, not the function"
    exec(f"from tritium.kernels import {name} as imported", ns := {})
    assert ns["imported"] is fn


def test_package_functions_are_callable_as_documented():
    from tritium.kernels import cross_entropy, rms_norm, swiglu
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(rms_norm(x, w), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(swiglu(g, u), torch.nn.functional.silu(g) * u)
    logits, targets = torch.randn(4, 11), torch.randint(0, 11, (4,))
    torch.testing.assert_close(cross_entropy(logits, targets), torch.nn.functional.cross_entropy(logits, targets))
    import tritium.kernels.norm as norm_module  # the submodule stays a module whatever was imported first
    assert norm_module.rms_norm is rms_norm
