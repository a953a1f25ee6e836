"""tritium.kernels: Triton kernels with autograd and PyTorch references."""
