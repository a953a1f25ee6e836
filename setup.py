"""Maps the top-level folders onto the ``tritium`` package.

The repository keeps ``kernels/``, ``model/``, ... at the top level so each
concern is one folder; users import them as ``tritium.kernels``,
``tritium.model``, ...  ``package_dir`` makes that true for editable installs
and wheels alike.
"""
from setuptools import setup

FOLDERS = ["kernels", "model", "train", "align", "serve", "bench"]

package_dir = {"tritium": "tritium"}
package_dir.update({f"tritium.{name}": name for name in FOLDERS})

setup(
    packages=["tritium"] + [f"tritium.{name}" for name in FOLDERS],
    package_dir=package_dir,
    package_data={
        "tritium.align": ["data/*"],
        "tritium.bench": ["*.sh", "*.md"],
        "tritium.serve": ["*.yaml", "*.json"],
    },
)
