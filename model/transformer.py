"""A Llama-style decoder in one sitting (after gpt-fast and nanoGPT).

token embedding -> N x [RMSNorm -> attention (RoPE, GQA) -> residual; RMSNorm -> FFN -> residual]
-> final RMSNorm -> LM head (tied to the embedding or not).

The backend is bound once -- when the model is built, moved, or ``set_backend`` is
called: ``model/backends.py`` resolves the spec to a ``Kernels`` table of functions
and every layer that computes calls them directly, so the same weights run on
tritium's Triton kernels, the PyTorch references, SDPA or flash-attn, and every
forward takes tensors only.  Module and parameter names are Hugging Face Llama's, minus
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
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tritium.kernels import rope_cos_sin
from tritium.model.backends import Kernels, parse_backend, resolve_backend
from tritium.model.config import ModelConfig

LOSS_REDUCTIONS = ("mean", "sum", "none")


class KVCache(Protocol):
    """What ``forward(kv_cache=...)`` needs; serve/kv_cache.py implements contiguous and paged caches.

    The model delegates the whole attention of a cached forward to ``attend``: each layer passes its
    index and the new q/k/v (RoPE applied), and the cache stores k/v and attends with its own kernel.
    """

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v (B, T, Hkv, D, RoPE applied) and return causal attention over cached + new, (B, T, Hq, D)."""


class RMSNorm(nn.Module):
    kernels: Kernels  # bound by Transformer (``_bind``), as in every module below that calls a kernel

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return self.kernels.rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    kernels: Kernels

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen: int = 0, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.kernels.apply_rope(q, k, cos, sin)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q, k, v)
        elif cu_seqlens is not None:  # packed documents: attention never crosses a boundary
            flat = lambda t: t.reshape(B * T, t.shape[2], self.head_dim)  # (N, H, D)
            out = self.kernels.varlen_attention(flat(q), flat(k), flat(v), cu_seqlens, max_seqlen)
        else:
            out = self.kernels.attention(q, k, v)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU (gate, up, down; Llama) or GELU (up, down; GPT-2 / the textbook "seed-7b")."""

    kernels: Kernels

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_type = cfg.ffn_type
        if cfg.ffn_type == "swiglu":
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_type == "swiglu":
            return self.down_proj(self.kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen: int = 0, kv_cache: KVCache | None = None):
        """x (B, T, H); cos/sin (T, D) or (B, T, D) from ``Transformer.rotary``; cu_seqlens (docs + 1,) int32."""
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, kv_cache)
        # The residual add rides inside the norm kernel: h = x + attn_out, normed = RMSNorm(h).
        normed, h = self.post_attention_layernorm(attn_out, residual=x)
        return h + self.mlp(normed)


class LMHead(nn.Module):
    """Logits, or the loss, from final hidden states.

    The loss lives here, not in ``Transformer.forward``, because under ZeRO-3 a
    parameter is only gathered inside the forward of the module that owns it.
    When tied, the weight belongs to the embedding; it is held through a plain
    list so it is neither registered twice nor untied by ``.to()``/``to_empty``.
    """

    kernels: Kernels

    def __init__(self, hidden_size: int, vocab_size: int, tied_embedding: nn.Embedding | None = None):
        super().__init__()
        self._tied = [tied_embedding] if tied_embedding is not None else []
        if tied_embedding is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def get_weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden, labels=None, reduction: str = "mean"):
        weight = self.get_weight()
        if labels is None:
            return F.linear(hidden, weight)  # (B, T, V)
        B, T, H = hidden.shape
        loss = self.kernels.linear_cross_entropy(hidden.reshape(B * T, H), weight, labels.reshape(B * T),
                                                 ignore_index=-100, reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, *, backend: str | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.backend = backend or config.backend  # validated by the setter, bound below
        self.gradient_checkpointing = gradient_checkpointing  # recompute each block in backward (saves memory)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size,
                              self.embed_tokens if config.tie_embeddings else None)
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bind(self.embed_tokens.weight.device)
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
        """The backend spec as requested (``effective_backend`` says what really runs)."""
        return self._backend

    @backend.setter
    def backend(self, spec: str) -> None:
        parse_backend(spec)  # fail here, not at the first forward
        self._backend = spec
        if hasattr(self, "embed_tokens"):  # set again after construction: rebind now
            self._bind(self.embed_tokens.weight.device)

    def set_backend(self, spec: str) -> None:
        """Rebind every layer to ``spec``'s functions (e.g. ``"triton"``, ``"torch,attention=sdpa"``)."""
        self.backend = spec

    @property
    def effective_backend(self) -> dict[str, str]:
        """{component: implementation that really runs} on the device the model is bound to, e.g.
        ``{"attention": "torch", ...}`` for ``backend="triton"`` on a CPU without the interpreter.
        Follows the parameters' device (the layers rebind at the first forward after a move)."""
        return resolve_backend(self._backend, self.embed_tokens.weight.device).effective

    def _bind(self, device: torch.device) -> None:
        # Resolve once and hand the functions to every layer, so forwards call them directly.
        self.kernels = resolve_backend(self._backend, device)
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, FeedForward, LMHead)):
                module.kernels = self.kernels

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), to_empty(): the device may have changed, and "auto" means different kernels there.
        result = super()._apply(fn, *args, **kwargs)
        self._bind(self.embed_tokens.weight.device)
        return result

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
        return self.lm_head(hidden, labels, loss_reduction)

    def forward_hidden(self, input_ids, position_ids=None, cu_seqlens=None, kv_cache=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, H)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if input_ids.device.type != self.kernels.device_type:  # parameters moved without .to() (ZeRO-3)
            self._bind(input_ids.device)
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
        cos, sin = self.rotary(T, position_ids, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, H)
        for layer in self.layers:
            if self.gradient_checkpointing and kv_cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, kv_cache)
        return self.norm(x)

    def rotary(self, seq_len: int, position_ids: torch.Tensor | None = None, device=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 RoPE (cos, sin) every block takes: rows 0..seq_len-1 as (T, D), or the rows at
        ``position_ids`` (B, T) as (B, T, D) (decode offsets, packed documents)."""
        device = torch.device(device) if device is not None else self.embed_tokens.weight.device
        # Computed once per device, kept out of state_dict (HF checkpoints do not store them).
        if device not in self._rope_tables:
            cfg = self.config
            self._rope_tables[device] = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                                     device=device, dtype=torch.float32)
        cos, sin = self._rope_tables[device]
        if position_ids is None:
            return cos[:seq_len], sin[:seq_len]
        return cos[position_ids], sin[position_ids]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str | None = None, device=None,
                        backend: str | None = None, config: ModelConfig | None = None,
                        verify: bool | None = None) -> Transformer:
        # Imported here: checkpoint.py imports this module at its top.
        from tritium.model.checkpoint import load_pretrained

        return load_pretrained(directory, dtype=dtype, device=device, backend=backend, config=config, verify=verify)

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | str | None = None) -> Path:
        from tritium.model.checkpoint import save_pretrained  # (see from_pretrained)

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
        import deepspeed  # heavy optional dependency: only a ZeRO-3 partitioned model gets here

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
