"""How tritium imports: a bare source checkout exposes only the package folders, and the command line
never hides a command whose module fails to import."""
import os
import subprocess
import sys
from pathlib import Path

from tritium import cli

REPO = Path(__file__).resolve().parents[1]

SOURCE_CHECKOUT = """
import sys, tritium, tritium.kernels, tritium.model.config
repo = sys.argv[1]
assert tritium.kernels.__file__ == f"{repo}/kernels/__init__.py", tritium.kernels.__file__
assert tritium.model.config.__file__ == f"{repo}/model/config.py", tritium.model.config.__file__
assert tritium.__path__ == [f"{repo}/tritium"], tritium.__path__
for name in ("tritium.setup", "tritium.tests", "tritium.Makefile"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise AssertionError(f"{name} imported from a source checkout")
print("ok")
"""


def test_source_checkout_exposes_only_the_package_folders(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SOURCE_CHECKOUT, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_command_module_that_fails_to_import_is_a_loud_error(monkeypatch, tmp_path, capsys):
    (tmp_path / "boom_command.py").write_text("raise RuntimeError('kaboom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = dict(cli.COMMANDS)
    for name, module, error in (("boom", "boom_command", "RuntimeError: kaboom"),
                                ("missing", "tritium.no_such_command", "ModuleNotFoundError")):
        monkeypatch.setattr(cli, "COMMANDS", {**commands, name: module})
        assert cli.main(["--help"]) == 1
        err = capsys.readouterr().err
        assert f"command {name!r} is unavailable: importing {module} failed" in err and error in err, err
