"""tritium: Triton kernels with PyTorch bindings, and the Llama-style model,
training, alignment and serving stack that runs on them."""
__version__ = "0.1.0"

__all__ = ["__version__"]
