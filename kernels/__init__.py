"""tritium.kernels: Triton kernels with autograd and PyTorch references.

Every public function is importable from here as the callable, the way Liger's functional API and
``torch.nn.functional`` are used: ``from tritium.kernels import rms_norm; rms_norm(x, weight)``.
The submodules are named for the kernel family (``norm``, ``mlp``, ``rope``, ``loss``,
``attention``, ``decode``) so that no function shares its submodule's name.

Public names are imported lazily (PEP 562 ``__getattr__``): ``import tritium.kernels`` does not
import triton, and never imports transformers (only ``tritium.kernels.hf`` does, on use).
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it (a new kernel family adds its names here)
_EXPORTS = {
    # RMSNorm (kernels/norm.py)
    "rms_norm": "norm", "rms_norm_ref": "norm",
    # SwiGLU (kernels/mlp.py)
    "swiglu": "mlp", "swiglu_ref": "mlp", "swiglu_mlp": "mlp", "swiglu_mlp_ref": "mlp",
    # RoPE (kernels/rope.py)
    "apply_rope": "rope", "apply_rope_ref": "rope", "rope_cos_sin": "rope",
    # cross-entropy (kernels/loss.py)
    "cross_entropy": "loss", "cross_entropy_ref": "loss",
    "fused_linear_cross_entropy": "loss", "fused_linear_cross_entropy_ref": "loss",
    # attention (kernels/attention.py, kernels/decode.py)
    "flash_attn_func": "attention", "flash_attn_varlen_func": "attention",
    "attention_ref": "attention", "varlen_attention_ref": "attention",
    "flash_attn_with_kvcache": "decode", "kvcache_attention_ref": "decode",
    # where the kernels run (CUDA, or CPU under TRITON_INTERPRET=1) rather than their references
    "triton_runs_on": "_runtime", "can_use_triton": "_runtime",
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
