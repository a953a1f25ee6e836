"""tritium: Triton kernels with PyTorch bindings, and the Llama-style model,
training, alignment and serving stack that runs on them."""
import os as _os

__version__ = "0.1.0"

# Installed (wheel or editable), setup.py's package_dir maps tritium.kernels -> kernels/ and so on.
# From a bare source checkout (PYTHONPATH=the repo, e.g. the GPU runbook on a machine where an install
# is not wanted) the same folders sit beside this one: let the package find them there.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.exists(_os.path.join(_root, "setup.py")) and _os.path.isdir(_os.path.join(_root, "kernels")):
    __path__.append(_root)  # noqa: F821 - __path__ is defined for packages

__all__ = ["__version__"]
