"""Swap tritium kernels into Hugging Face Llama-family models: ``patch(model)``.

Supported: Llama, Mistral and Qwen2 decoders (``*ForCausalLM`` and the bare ``*Model``), i.e.
RMSNorm + SwiGLU MLP + rotate_half RoPE + a linear LM head. ``transformers`` is an optional
dependency: it is imported here only, never by ``import tritium.kernels``.

What each switch does:
- ``rms_norm``: every ``<Arch>RMSNorm`` instance runs ``rms_norm`` (same HF casting).
- ``mlp``: every ``<Arch>MLP`` instance runs ``down_proj(swiglu(gate_proj(x), up_proj(x)))``; the
  ``nn.Linear`` children stay (LoRA, biases, ZeRO-3 hooks keep working). Needs ``hidden_act`` silu.
- ``rope``: ``apply_rotary_pos_emb`` runs ``apply_rope`` on HF's (B, H, T, D) tensors through
  transposed views (no copies). That function lives at module level in ``modeling_<arch>``; it is
  wrapped once, and takes the kernel only while a patched model's attention module runs (a
  thread-local flag set by the patched attention ``forward``), so unpatched models of the same
  architecture keep HF's code. Calls the kernel cannot handle fall back to the original.
- ``loss``: with ``labels``, ``<Arch>ForCausalLM.forward`` computes the loss with fused linear
  cross-entropy inside ``lm_head``'s forward (so ZeRO-3 gathers the head weight) and never builds the
  training logits: ``logits`` is None in training mode; in eval mode the logits are computed as
  well. Labels are shifted as HF does (or taken from ``shift_labels``); ``num_items_in_batch`` is
  honoured (sum / num_items_in_batch). Without labels the forward is unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import threading
import types
from typing import Any

import torch
import torch.nn.functional as F

from tritium.kernels.loss import fused_linear_cross_entropy
from tritium.kernels.mlp import swiglu
from tritium.kernels.norm import rms_norm
from tritium.kernels.rope import apply_rope

SUPPORTED_ARCHITECTURES = {
    # model_type -> (modeling module, class prefix)
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}
_SUPPORTED_TEXT = ", ".join(f"{prefix}ForCausalLM/{prefix}Model" for _, prefix in SUPPORTED_ARCHITECTURES.values())


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# Set while a patched attention module runs: the module-level RoPE function serves every model of
# the architecture, and only patched models (including checkpoint recomputation) take the kernel.
_ROPE_ACTIVE = threading.local()


def _rope_active() -> bool:
    return getattr(_ROPE_ACTIVE, "depth", 0) > 0


def _with_rope_kernel(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        _ROPE_ACTIVE.depth = getattr(_ROPE_ACTIVE, "depth", 0) + 1
        try:
            return forward(*args, **kwargs)
        finally:
            _ROPE_ACTIVE.depth -= 1

    wrapped._tritium_rope = True
    return wrapped


def _make_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        # HF layout: q (B, Hq, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) broadcast over heads.
        if (not _rope_active() or unsqueeze_dim != 1 or kwargs or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
                or cos.shape[-1] != q.shape[-1] or cos.shape[-2] != q.shape[-2]):
            return apply_rotary_pos_emb._tritium_original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    apply_rotary_pos_emb._tritium_original = original
    return apply_rotary_pos_emb


def _head_forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    if targets is None:
        return F.linear(hidden, self.weight, self.bias)
    if self.bias is not None:
        raise ValueError("tritium.kernels.hf.patch(loss=True) supports lm_head without bias only")
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1),
                                      ignore_index=ignore_index, reduction=reduction)


def _make_causal_lm_forward(original_forward):
    signature = inspect.signature(original_forward)
    var_kw = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    def forward(self, *args, **kwargs):
        call = dict(signature.bind_partial(self, *args, **kwargs).arguments)
        call.pop("self")
        for name in var_kw:
            call.update(call.pop(name, None) or {})
        labels = call.pop("labels", None)
        if labels is None and call.get("shift_labels") is None:
            return original_forward(self, *args, **kwargs)
        shift_labels = call.pop("shift_labels", None)
        num_items_in_batch = call.pop("num_items_in_batch", None)
        ignore_index = call.pop("ignore_index", -100)
        logits_to_keep = call.pop("logits_to_keep", 0)
        return_dict = call.pop("return_dict", None)
        outputs = self.model(**call)
        hidden = outputs[0]
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = self.lm_head(hidden, targets=shift_labels, ignore_index=ignore_index, reduction=reduction)
        if num_items_in_batch is not None:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
        logits = None
        if not self.training:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
        from transformers.modeling_outputs import CausalLMOutputWithPast  # heavy optional import: on use only
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        result: dict[str, Any] = {"loss": loss, "logits": logits}
        for name in ("past_key_values", "cache", "hidden_states", "attentions"):
            if name in fields:
                result[name] = getattr(outputs, name, None)
        out = CausalLMOutputWithPast(**result)
        return out.to_tuple() if return_dict is False else out

    forward._tritium_original = original_forward
    return forward


def patch(model: torch.nn.Module, rms_norm: bool = True, mlp: bool = True, rope: bool = True,
          loss: bool = True) -> torch.nn.Module:
    """Swap RMSNorm, MLP, RoPE and the LM loss of an HF Llama/Mistral/Qwen2 model for tritium kernels.

    Patches in place (idempotent) and returns ``model``. Outputs match the unpatched model within
    kernel tolerance. Raises ValueError naming the supported architectures for anything else.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"tritium.kernels.hf.patch does not support {type(model).__name__} "
                         f"(model_type={model_type!r}); supported: {_SUPPORTED_TEXT}")
    module_name, prefix = SUPPORTED_ARCHITECTURES[model_type]
    modeling = importlib.import_module(module_name)
    norm_cls = getattr(modeling, f"{prefix}RMSNorm")
    mlp_cls = getattr(modeling, f"{prefix}MLP")
    attention_cls = getattr(modeling, f"{prefix}Attention")

    if mlp:
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"patch(mlp=True) needs hidden_act 'silu' (SwiGLU), this model uses {act!r}; "
                             "pass mlp=False")
    for module in model.modules():
        if rms_norm and isinstance(module, norm_cls):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif mlp and isinstance(module, mlp_cls):
            module.forward = types.MethodType(_mlp_forward, module)
        elif rope and isinstance(module, attention_cls) and not getattr(module.forward, "_tritium_rope", False):
            module.forward = _with_rope_kernel(module.forward)

    if rope and not hasattr(modeling.apply_rotary_pos_emb, "_tritium_original"):
        modeling.apply_rotary_pos_emb = _make_rope(modeling.apply_rotary_pos_emb)

    causal_cls = getattr(modeling, f"{prefix}ForCausalLM")
    if loss and isinstance(model, causal_cls):
        if getattr(model.lm_head, "bias", None) is not None:
            raise ValueError("patch(loss=True) needs an lm_head without bias; pass loss=False")
        if not hasattr(model.forward, "_tritium_original"):
            model.lm_head.forward = types.MethodType(_head_forward, model.lm_head)
            model.forward = types.MethodType(_make_causal_lm_forward(causal_cls.forward), model)
    model._tritium_patched = {"rms_norm": rms_norm, "mlp": mlp, "rope": rope, "loss": loss}
    return model
