"""The dials of a Llama-style model: ``ModelConfig`` and named presets.

The dials fix the shape (and so the parameter count) before any token is
seen.  ``model/sizing.py`` turns a config into parameters, FLOPs, memory and
cost; ``model/transformer.py`` turns it into a module.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FFN_TYPES = ("swiglu", "gelu")


class ConfigFile:
    """JSON (and YAML) files for a config dataclass: ``to_dict``/``to_json`` out, ``read_file`` and
    ``checked_fields`` in.  ``ModelConfig`` and ``TrainConfig`` share it."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as sorted, indented JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def checked_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with ``-`` in keys read as ``_``; ValueError naming any key that is not a field."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return data

    @classmethod
    def read_file(cls, path: str | Path, what: str) -> dict[str, Any]:
        """The mapping in a JSON file, or a YAML one (``.yaml``/``.yml``); errors name ``what`` and the path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{what} {path} could not be parsed: {exc}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} {path} could not be parsed (not valid JSON): {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{what} {path} must hold a mapping of {cls.__name__} fields")
        return data


@dataclass
class ModelConfig(ConfigFile):
    hidden_size: int = 4096  # width of the residual stream
    num_layers: int = 32  # decoder blocks
    num_heads: int = 32  # query heads
    num_kv_heads: int | None = None  # key/value heads (GQA); None = num_heads (MHA)
    head_dim: int | None = None  # per-head width; None = hidden_size // num_heads
    ffn_hidden: int = 11008  # inner width of the feed-forward network
    ffn_type: str = "swiglu"  # "swiglu" (gate, up, down: 3 matrices) or "gelu" (up, down: 2 matrices)
    vocab_size: int = 32000  # tokenizer vocabulary = embedding and head rows
    max_seq_len: int = 4096  # longest context the RoPE tables and KV cache are sized for
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: dict[str, Any] | None = None  # HF-style scaling, e.g. {"rope_type": "linear", "factor": 2.0}
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # LM head shares the token embedding matrix
    initializer_range: float = 0.02  # std of the normal init (residual projections scaled down further)
    backend: str = "auto"  # kernels: auto|triton|torch|sdpa|flash_attn, or per component "torch,attention=sdpa"
    name: str = field(default="custom", compare=False)  # preset name, for display only

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for dial in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, dial)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{dial} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                    "choose a divisor or set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be a positive even integer (RoPE rotates pairs), "
                             f"got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads} (each kv head serves a whole group of query heads)")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ModelConfig.ffn_type must be one of {FFN_TYPES}, got {self.ffn_type!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    # ------------------------------------------------------------------ derived
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        dials = {**PRESETS[key], **overrides}
        return cls(name=key, **dials)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if "architectures" in data or "num_hidden_layers" in data:
            return cls.from_hf_dict(data)
        return cls(**cls.checked_fields(data))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(cls.read_file(path, "model config"))

    # ------------------------------------------------------------------ Hugging Face
    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A ``transformers.LlamaConfig``-compatible dict (``config.json`` of an HF checkpoint)."""
        if self.ffn_type != "swiglu":
            raise ValueError("only ffn_type='swiglu' maps onto Hugging Face LlamaForCausalLM")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"Hugging Face config: model_type {model_type!r} is not a Llama-style decoder "
                             "(supported: llama, mistral, qwen2)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Hugging Face config: hidden_act {hf.get('hidden_act')!r} is not supported (silu only)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("Hugging Face config: attention_bias/mlp_bias=True is not supported")
        try:
            num_heads = hf["num_attention_heads"]
            return cls(
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
                ffn_hidden=hf["intermediate_size"],
                vocab_size=hf["vocab_size"],
                max_seq_len=hf.get("max_position_embeddings", 4096),
                rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                rope_scaling=hf.get("rope_scaling") or _scaling_from_rope_parameters(hf.get("rope_parameters")),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                initializer_range=hf.get("initializer_range", 0.02),
                name=hf.get("_name_or_path") or "hf",
            )
        except KeyError as exc:
            raise ValueError(f"Hugging Face config is missing required field {exc.args[0]!r}") from None


def _scaling_from_rope_parameters(rope: dict[str, Any] | None) -> dict[str, Any] | None:
    """transformers >= 5 writes ``rope_parameters`` (theta + scaling in one dict) instead of ``rope_scaling``."""
    if not rope or rope.get("rope_type", rope.get("type", "default")) == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta"}


# Named presets.  llama2-7b must count exactly 6,738,415,616 parameters.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in minutes; vocab matches the demo's tokenizer.
    "tiny": dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=32, ffn_hidden=512,
                 vocab_size=2048, max_seq_len=256, norm_eps=1e-5, tie_embeddings=True),
    # GPT-2-small-sized Llama (~124M parameters).
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, ffn_hidden=2560,
                  vocab_size=32000, max_seq_len=2048, tie_embeddings=True),
    # Llama-3.2-1B geometry (1.24B parameters).
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, ffn_hidden=8192,
               vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_hidden=11008,
                      vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_hidden=14336,
                      vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    # The textbook "7B": a two-matrix FFN 4x wide, so most parameters live in the FFN.
    "seed-7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                    ffn_hidden=16384, ffn_type="gelu", vocab_size=32000, max_seq_len=4096),
}
