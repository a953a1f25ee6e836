"""Attention forward/backward/varlen and decode over a KV cache.

FLOPs follow the flash-attention convention: 4·B·H·T·S·D for the forward
(two matmuls), 2.5× that for the backward, halved when causal.  Decode is
memory-bound: its bytes are the K and V cache actually read.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from tritium.bench.registry import Case, Skip, fwd_bwd, need_cuda, register


def _esize(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def _flash_attn(device):
    if device != "cuda":
        raise Skip("flash-attn runs on CUDA only")
    if importlib.util.find_spec("flash_attn") is None:
        raise Skip("flash-attn not installed (optional: pip install tritium[flash])")
    import flash_attn

    return flash_attn


def _sdpa_backend(name: str, device: str):
    from torch.nn.attention import SDPBackend

    if device != "cuda" and name != "math":
        raise Skip(f"SDPA {name} backend is CUDA-only")
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _attn_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.kernels.attention import attention_ref, flash_attn_func

        B, T, H, D, causal = size["B"], size["T"], size["H"], size["D"], size["causal"]
        grad = mode != "fwd"
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
        if kind == "tritium":
            need_cuda(device)
            forward = lambda: flash_attn_func(q, k, v, causal=causal)
        elif kind == "flash_attn":
            fa = _flash_attn(device)
            forward = lambda: fa.flash_attn_func(q, k, v, causal=causal)
        elif kind == "naive":
            if B * H * T * T * 4 > 4 * 2**30:
                raise Skip("naive eager attention would hold more than 4 GiB of scores")
            forward = lambda: attention_ref(q, k, v, causal=causal)
        else:
            from torch.nn.attention import sdpa_kernel

            backend = _sdpa_backend(kind.split("_", 1)[1], device)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) views

            def forward():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return fwd_bwd(forward, mode, [q, k, v])
    return factory


def _attn_flops(size, mode):
    fwd = 4 * size["B"] * size["H"] * size["T"] * size["T"] * size["D"]
    if size["causal"]:
        fwd /= 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _attn_sizes(seqs, dims=(64, 128), causal=(False, True)):
    # B·T = 16k tokens and H·D = 2048, as in the Triton and flash-attention benchmarks.
    return [{"B": max(1, 16384 // t), "T": t, "H": 2048 // d, "D": d, "causal": c}
            for d in dims for c in causal for t in seqs]


ATTN_PROVIDERS = ("tritium", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn", "naive")

register(Case(
    name="attention", area="attention",
    sizes=_attn_sizes((512, 1024, 2048, 4096, 8192, 16384)),
    quick_sizes=_attn_sizes((1024, 4096), dims=(128,)),
    cpu_sizes=[{"B": 1, "T": 128, "H": 2, "D": 64, "causal": True}],
    providers={**{p: _attn_factory(p) for p in ATTN_PROVIDERS}, "sdpa_math": _attn_factory("sdpa_math")},
    metric="TFLOP/s", modes=("fwd", "bwd", "fwd+bwd"), flops=_attn_flops, baseline="sdpa_flash",
))


# ----------------------------------------------------------------------------- varlen
def _varlen_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.kernels.attention import flash_attn_varlen_func

        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(size["T"] // 4, size["T"] + 1, (size["docs"],), generator=gen)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        cu = cu.to(device)
        total, H, D, max_len = int(cu[-1]), size["H"], size["D"], int(lengths.max())
        grad = mode != "fwd"
        q, k, v = (torch.randn(total, H, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
        bounds = cu.tolist()
        if kind == "tritium":
            need_cuda(device)
            forward = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        elif kind == "flash_attn":
            fa = _flash_attn(device)
            forward = lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        else:  # what users do without a varlen kernel: one SDPA call per document
            def forward():
                outs = []
                for s, e in zip(bounds[:-1], bounds[1:]):
                    qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
                    outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
                return torch.cat(outs)
        return fwd_bwd(forward, mode, [q, k, v])
    return factory


def _varlen_flops(size, mode):
    # Expected tokens per doc is ~5T/8; count with the mean squared length of U[T/4, T].
    lo, hi = size["T"] / 4, size["T"]
    mean_sq = (hi**3 - lo**3) / (3 * (hi - lo))
    fwd = 4 * size["docs"] * size["H"] * mean_sq * size["D"] / 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


register(Case(
    name="attention_varlen", area="attention",
    sizes=[{"docs": 16, "T": t, "H": 16, "D": 128} for t in (1024, 2048, 4096)],
    quick_sizes=[{"docs": 16, "T": 2048, "H": 16, "D": 128}],
    cpu_sizes=[{"docs": 3, "T": 64, "H": 2, "D": 64}],
    providers={"tritium": _varlen_factory("tritium"), "flash_attn": _varlen_factory("flash_attn"),
               "sdpa_per_doc": _varlen_factory("sdpa_per_doc")},
    metric="TFLOP/s", modes=("fwd", "fwd+bwd"), flops=_varlen_flops, baseline="sdpa_per_doc",
    note="flops approximate: document lengths are drawn uniformly from [T/4, T]",
))


# ----------------------------------------------------------------------------- decode
def _decode_factory(kind: str):
    def factory(size, mode, device, dtype):
        from tritium.kernels.decode import flash_attn_with_kvcache, kvcache_attention_ref

        B, L, Hq, Hkv, D = size["B"], size["L"], size["Hq"], size["Hkv"], size["D"]
        q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
        k_cache = torch.randn(B, L, Hkv, D, device=device, dtype=dtype)
        v_cache = torch.randn(B, L, Hkv, D, device=device, dtype=dtype)
        seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
        if kind == "tritium":
            need_cuda(device)
            return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        if kind == "flash_attn":
            fa = _flash_attn(device)
            return lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        if kind == "torch":
            return lambda: kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens=seqlens)
        # SDPA with GQA over the whole cache: what a model without a decode kernel does
        qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    return factory


def _decode_bytes(size, mode, dtype):
    kv = 2 * size["B"] * size["L"] * size["Hkv"] * size["D"] * _esize(dtype)
    q_out = 2 * size["B"] * size["Hq"] * size["D"] * _esize(dtype)
    return kv + q_out


def _decode_sizes():
    one = [{"B": 1, "L": length, "Hq": 32, "Hkv": 8, "D": 128} for length in (1024, 4096, 16384, 65536, 131072)]
    many = [{"B": 64, "L": length, "Hq": 32, "Hkv": 8, "D": 128} for length in (1024, 4096, 16384)]
    return one + many


register(Case(
    name="decode_attention", area="attention",
    sizes=_decode_sizes(),
    quick_sizes=[{"B": 1, "L": 16384, "Hq": 32, "Hkv": 8, "D": 128}, {"B": 64, "L": 4096, "Hq": 32, "Hkv": 8, "D": 128}],
    cpu_sizes=[{"B": 1, "L": 512, "Hq": 8, "Hkv": 2, "D": 64}],
    providers={"tritium": _decode_factory("tritium"), "flash_attn": _decode_factory("flash_attn"),
               "sdpa": _decode_factory("sdpa"), "torch": _decode_factory("torch")},
    metric="GB/s", modes=("fwd",), bytes=_decode_bytes, baseline="sdpa",
))
