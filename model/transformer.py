"""A Llama-style decoder in one sitting (after gpt-fast and nanoGPT).

token embedding -> N x [RMSNorm -> attention (RoPE, GQA) -> residual; RMSNorm -> FFN -> residual]
-> final RMSNorm -> LM head (tied to the embedding or not).

Every numerical primitive goes through ``self.backend`` (see ``model/backends.py``),
so the same weights run on tritium's Triton kernels, the PyTorch references,
SDPA or flash-attn.  Module and parameter names are Hugging Face Llama's, minus
the ``model.`` prefix (``model/checkpoint.py`` adds it), so checkpoints map 1:1.

Conventions the rest of tritium relies on:
* ``labels`` are already-shifted targets: ``labels[b, t]`` is the token that
  should follow position ``t``; -100 is ignored.  The model never shifts.
* The loss never materialises (B, T, V) logits: it runs fused linear
  cross-entropy inside ``LMHead`` -- the module that owns the head weight, so
  ZeRO-3's hooks gather that weight around the loss (see ``zero3_external_params``).
* RoPE uses the Hugging Face rotate_half layout, so HF Llama weights load
  without any q/k permutation; Meta's original checkpoints use interleaved
  pairs and need ``checkpoint.permute_qk_for_hf`` first.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tritium.model.backends import Ops, parse_backend, resolve_backend, rope_cos_sin
from tritium.model.config import ModelConfig

LOSS_REDUCTIONS = ("mean", "sum", "none")


class KVCache(Protocol):
    """What ``forward(kv_cache=...)`` needs; serve/kv_cache.py implements contiguous and paged caches."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v (B, T, Hkv, D, RoPE applied) and return causal attention over cached + new, (B, T, Hq, D)."""


@dataclass
class _Context:
    """Per-forward inputs every block shares (one object keeps checkpointed block calls simple)."""

    ops: Ops
    cos: torch.Tensor  # (max_seq_len, D) fp32
    sin: torch.Tensor
    position_ids: torch.Tensor | None  # (B, T), or None for 0..T-1
    cu_seqlens: torch.Tensor | None  # (num_docs + 1,) int32 over the flattened B*T tokens
    max_seqlen: int
    kv_cache: Any


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, ops: Ops, residual=None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = ctx.ops.apply_rope(q, k, ctx.cos, ctx.sin, ctx.position_ids)
        if ctx.kv_cache is not None:
            out = ctx.kv_cache.attend(self.layer_idx, q, k, v)
        elif ctx.cu_seqlens is not None:  # packed documents: attention never crosses a boundary
            flat = lambda t: t.reshape(B * T, t.shape[2], self.head_dim)  # (N, H, D)
            out = ctx.ops.varlen_attention(flat(q), flat(k), flat(v), ctx.cu_seqlens, ctx.max_seqlen)
        else:
            out = ctx.ops.attention(q, k, v, causal=True)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU (gate, up, down; Llama) or GELU (up, down; GPT-2 / the textbook "seed-7b")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_type = cfg.ffn_type
        if cfg.ffn_type == "swiglu":
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        if self.ffn_type == "swiglu":
            return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(x, ctx.ops), ctx)
        # The residual add rides inside the norm kernel: h = x + attn_out, normed = RMSNorm(h).
        normed, h = self.post_attention_layernorm(attn_out, ctx.ops, residual=x)
        return h + self.mlp(normed, ctx.ops)


class LMHead(nn.Module):
    """Logits, or the loss, from final hidden states.

    The loss lives here, not in ``Transformer.forward``, because under ZeRO-3 a
    parameter is only gathered inside the forward of the module that owns it.
    When tied, the weight belongs to the embedding; it is held through a plain
    list so it is neither registered twice nor untied by ``.to()``/``to_empty``.
    """

    def __init__(self, hidden_size: int, vocab_size: int, tied_embedding: nn.Embedding | None = None):
        super().__init__()
        self._tied = [tied_embedding] if tied_embedding is not None else []
        if tied_embedding is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def get_weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden, ops: Ops, labels=None, reduction: str = "mean"):
        weight = self.get_weight()
        if labels is None:
            return F.linear(hidden, weight)  # (B, T, V)
        B, T, H = hidden.shape
        loss = ops.linear_cross_entropy(hidden.reshape(B * T, H), weight, labels.reshape(B * T),
                                        ignore_index=-100, reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, *, backend: str | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.backend = backend or config.backend  # validated by the setter
        self.gradient_checkpointing = gradient_checkpointing  # recompute each block in backward (saves memory)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size,
                              self.embed_tokens if config.tie_embeddings else None)
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) everywhere; residual-stream writers (o_proj, down_proj) get
        std / sqrt(2 * num_layers) (GPT-2, Megatron-LM), since 2 * num_layers of them add into the
        residual stream and its variance would otherwise grow with depth.  Norm weights are 1.
        A no-op on the meta device (describe a 7B model for free; call again after ``to_empty``).
        Under ``deepspeed.zero.Init`` parameters are already partitioned when this runs, so each
        module's are gathered in turn (rank 0 initialises, ZeRO broadcasts), as HF does."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with _gathered(params):
                if isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
                else:  # Linear, Embedding, untied LMHead
                    scaled = name.endswith(("o_proj", "down_proj"))
                    nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.config.num_layers) if scaled else std)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The (V, H) head matrix (the embedding matrix when tied)."""
        return self.lm_head.get_weight()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, spec: str) -> None:
        parse_backend(spec)  # fail here, not at the first forward
        self._backend = spec
        self._ops: dict[str, Ops] = {}

    def set_backend(self, spec: str) -> None:
        self.backend = spec

    def ops(self, device: torch.device) -> Ops:
        """The backend's functions for ``device`` (cached per device type: after one eager call,
        torch.compile sees a constant lookup, not the resolver's imports)."""
        ops = self._ops.get(device.type)
        if ops is None:
            ops = self._ops[device.type] = resolve_backend(self.backend, device)
        return ops

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, labels=None, kv_cache=None,
                loss_reduction: str = "mean"):
        """Logits (B, T, V) without labels; with labels, the loss: scalar ("mean"/"sum") or the
        per-token NLL (B, T) with 0 at ignored positions ("none")."""
        if labels is not None:
            if loss_reduction not in LOSS_REDUCTIONS:
                raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)} (labels are pre-shifted targets)")
        hidden = self.forward_hidden(input_ids, position_ids, cu_seqlens, kv_cache)
        return self.lm_head(hidden, self.ops(input_ids.device), labels, loss_reduction)

    def forward_hidden(self, input_ids, position_ids=None, cu_seqlens=None, kv_cache=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, H)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        ops = self.ops(input_ids.device)
        max_seqlen = T
        if cu_seqlens is not None:
            if kv_cache is not None:
                raise ValueError("cu_seqlens and kv_cache cannot be combined (decode one batch of sequences instead)")
            cu_seqlens, max_seqlen = _check_cu_seqlens(cu_seqlens, B * T)
            if position_ids is None:  # positions restart at 0 in every packed document
                position_ids = _positions_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
        if kv_cache is not None and position_ids is None:
            raise ValueError("kv_cache needs position_ids (B, T): the cache, not the model, knows the offsets")
        if position_ids is not None and tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}")
        if position_ids is None and T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self._rope(input_ids.device)
        ctx = _Context(ops, cos, sin, position_ids, cu_seqlens, max_seqlen, kv_cache)
        x = self.embed_tokens(input_ids)  # (B, T, H)
        for layer in self.layers:
            if self.gradient_checkpointing and kv_cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.norm(x, ops)

    def _rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 tables computed once per device, kept out of state_dict (HF checkpoints do not store them).
        if device not in self._rope_tables:
            cfg = self.config
            self._rope_tables[device] = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta,
                                                     cfg.rope_scaling, device)
        return self._rope_tables[device]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str | None = None, device=None,
                        backend: str | None = None, config: ModelConfig | None = None) -> Transformer:
        from tritium.model.checkpoint import load_pretrained

        return load_pretrained(directory, dtype=dtype, device=device, backend=backend, config=config)

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | str | None = None) -> Path:
        from tritium.model.checkpoint import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size, dtype=dtype)


def zero3_external_params(model: Transformer) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, parameter) pairs a ZeRO-3 engine must register before training::

        for module, param in zero3_external_params(model):
            deepspeed.zero.register_external_parameter(module, param)

    With tied embeddings ``LMHead`` uses the embedding's weight, which it does not own, so ZeRO-3
    would not gather it around the head's forward (the fused loss) without this registration.
    """
    if isinstance(model.lm_head, LMHead) and model.lm_head._tied:
        return [(model.lm_head, model.embed_tokens.weight)]
    return []


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):  # partitioned by DeepSpeed ZeRO-3
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor (num_docs + 1,), got "
                         f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()  # one host sync; the varlen kernels need max_seqlen as an int anyway
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must rise from 0 to B*T={total}, got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    return cu_seqlens.to(torch.int32), max(b - a for a, b in itertools.pairwise(bounds))


def _positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)
