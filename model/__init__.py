"""tritium.model: the Llama-style model, its config, backends and checkpoints.

Names are resolved lazily (PEP 562) so ``import tritium.model`` stays cheap: torch, the kernels
and safetensors load only when a name that needs them is first used.
"""
import importlib

_EXPORTS = {
    "ModelConfig": "tritium.model.config",
    "PRESETS": "tritium.model.config",
    "Transformer": "tritium.model.transformer",
    "LMHead": "tritium.model.transformer",
    "zero3_external_params": "tritium.model.transformer",
    "Kernels": "tritium.model.backends",
    "parse_backend": "tritium.model.backends",
    "resolve_backend": "tritium.model.backends",
    "CheckpointError": "tritium.model.checkpoint",
    "load_pretrained": "tritium.model.checkpoint",
    "save_pretrained": "tritium.model.checkpoint",
    "permute_qk_for_hf": "tritium.model.checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tritium.model' has no attribute {name!r}")
