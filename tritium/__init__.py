"""tritium: Triton kernels with PyTorch bindings, and the Llama-style model,
training, alignment and serving stack that runs on them."""
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"
__all__ = ["__version__"]

# The package folders that live beside this one in a source checkout (setup.py's package_dir maps them).
PACKAGES = ("kernels", "model", "train", "align", "serve", "bench")


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``tritium.<folder>`` in ``<root>/<folder>`` for the package folders only, so a bare
    source checkout (PYTHONPATH=the repo, e.g. the GPU runbook where an install is not wanted)
    imports like an install does -- and ``tritium.setup`` or ``tritium.tests`` do not exist."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.partition(".")
        if parent != __name__ or name not in PACKAGES:
            return None  # deeper names resolve through the package's __path__
        folder = os.path.join(self.root, name)
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


# Installed (wheel or editable), the install maps tritium.kernels -> kernels/ and so on.  From a source
# checkout the folders sit beside this one: this finder goes first so a stale editable install of
# another checkout never wins over the tree that ``tritium`` itself came from.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_root, "setup.py")) and os.path.isdir(os.path.join(_root, "kernels")):
    if not any(type(f).__name__ == "_SourceCheckoutFinder" for f in sys.meta_path):  # survives a reload
        sys.meta_path.insert(0, _SourceCheckoutFinder(_root))
