"""The wheel works on its own: build it once, import from it with the repository off sys.path.

Both ``pip install -e .`` and ``pip wheel .`` must give a working ``tritium.kernels``; the
editable install is what every other test uses, so this one checks the wheel.  The source is
copied to a temporary folder first, so the build never writes into the checkout.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "model", "train", "align", "serve", "bench")
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "tests",
                                ".pytest_cache", ".hypothesis", ".benchmarks", ".whl", ".ruff_cache", "*.pyc")


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                           "-w", str(tmp / "dist")], check=False, cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list((tmp / "dist").glob("tritium-*.whl"))
    assert len(wheels) == 1
    site = tmp / "site"
    with zipfile.ZipFile(wheels[0]) as archive:
        names = archive.namelist()
        archive.extractall(site)
    for folder in FOLDERS:
        assert f"tritium/{folder}/__init__.py" in names, f"wheel is missing tritium.{folder}"
    assert not any(name.startswith(("tests/", "kernels/", "model/")) for name in names)
    return site


def test_wheel_imports_without_the_repository(unpacked_wheel, tmp_path):
    # -S: no site processing, so the editable install's path hook cannot bring the checkout back;
    # sys.path = stdlib + the unpacked wheel + site-packages (for torch, triton, ...).
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import tritium, tritium.kernels, tritium.model.sizing as s\n"
        "from tritium.model.config import ModelConfig\n"
        "assert tritium.kernels.__file__.startswith(sys.argv[1]), tritium.kernels.__file__\n"
        "assert sys.argv[3] not in sys.path, sys.path\n"
        "mods = [m for n, m in sys.modules.items() if n.startswith('tritium') and getattr(m, '__file__', None)]\n"
        "assert all(m.__file__.startswith(sys.argv[1]) for m in mods), [m.__file__ for m in mods]\n"
        "print(s.count_parameters(ModelConfig.from_name('llama2-7b')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(unpacked_wheel), sysconfig.get_paths()["purelib"],
                           str(REPO)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "6738415616"


def _tritium_command():
    script = Path(sys.executable).with_name("tritium")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tritium"]


def test_console_script_help_and_describe(tmp_path):
    help_proc = subprocess.run(_tritium_command() + ["--help"], check=False, capture_output=True, text=True,
                               timeout=120, cwd=tmp_path)
    assert help_proc.returncode == 0, help_proc.stderr
    for command in ("describe", "tokenizer", "data"):
        assert command in help_proc.stdout
    proc = subprocess.run(_tritium_command() + ["describe", "--preset", "llama2-7b"], check=False,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6,738,415,616" in proc.stdout
