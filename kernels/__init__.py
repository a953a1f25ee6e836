"""tritium.kernels: Triton kernels with autograd and PyTorch references.

Public names are imported lazily (PEP 562 ``__getattr__``): ``import tritium.kernels`` does not
import triton, and never imports transformers (only ``tritium.kernels.hf`` does, on use).

Three functions share their submodule's name: ``rms_norm``, ``swiglu`` and ``cross_entropy``.
Python binds a package attribute to the submodule once it is imported, so
``tritium.kernels.rms_norm`` is (always) the module; import those functions from it:
``from tritium.kernels.rms_norm import rms_norm``. Exporting them here instead would make
``import tritium.kernels.rms_norm as m`` return the function or the module depending on
import order.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it (kernel workers add their families here)
_EXPORTS = {
    # RMSNorm (the function itself: tritium.kernels.rms_norm.rms_norm, see above)
    "rms_norm_ref": "rms_norm",
    # SwiGLU (swiglu itself: tritium.kernels.swiglu.swiglu)
    "swiglu_ref": "swiglu", "swiglu_mlp": "swiglu", "swiglu_mlp_ref": "swiglu",
    # RoPE
    "apply_rope": "rope", "apply_rope_ref": "rope", "rope_cos_sin": "rope",
    # cross-entropy
    "cross_entropy_ref": "cross_entropy",  # cross_entropy itself: tritium.kernels.cross_entropy
    "fused_linear_cross_entropy": "cross_entropy", "fused_linear_cross_entropy_ref": "cross_entropy",
    # attention (kernels/attention.py, kernels/decode.py)
    "flash_attn_func": "attention", "flash_attn_varlen_func": "attention",
    "attention_ref": "attention", "varlen_attention_ref": "attention",
    "flash_attn_with_kvcache": "decode", "kvcache_attention_ref": "decode",
    # modules
    "RMSNorm": "modules", "SwiGLUMLP": "modules", "RotaryEmbedding": "modules",
    "FusedLinearCrossEntropyLoss": "modules", "LinearCrossEntropyHead": "modules",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tritium.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tritium.kernels.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
