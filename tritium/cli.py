"""The ``tritium`` command line: thin argument parsing over importable functions.

Each command lives in the package that owns it, as a module with
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only to build the parser, and heavy imports (deepspeed,
fastapi) happen inside ``run`` so ``tritium --help`` stays quick.  A command
module that fails to import is an error naming the module and the exception,
never a command that silently disappears from ``--help``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from tritium import __version__

# command name -> module implementing it
COMMANDS: dict[str, str] = {
    "describe": "tritium.model.cli_describe",
    "tokenizer": "tritium.model.cli_tokenizer",
    "data": "tritium.train.cli_data",
    "train": "tritium.train.cli_train",
    "sft": "tritium.align.cli_sft",
    "dpo": "tritium.align.cli_dpo",
    "grpo": "tritium.align.cli_grpo",
    "align-eval": "tritium.align.cli_eval",
    "generate": "tritium.serve.cli_generate",
    "serve": "tritium.serve.cli_serve",
    "serve-bench": "tritium.serve.cli_serve_bench",
    "bench": "tritium.bench.cli",
    "demo": "tritium.demo",
}

# Errors that mean "the user asked for something wrong": one line, exit 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, KeyError,
               NotADirectoryError, IsADirectoryError)


class CommandImportError(RuntimeError):
    """A command's module could not be imported (a broken install or a bug, never "not built yet")."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritium",
        description="Triton kernels and the Llama-style lifecycle: describe, train, align, serve, bench.")
    parser.add_argument("--version", action="version", version=f"tritium {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any failure is reported with the command it breaks
            raise CommandImportError(f"command {name!r} is unavailable: importing {module_name} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CommandImportError as exc:
        if os.environ.get("TRITIUM_DEBUG"):
            traceback.print_exc()
        print(f"tritium: error: {exc} (set TRITIUM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        code = args._run(args)
    except BrokenPipeError:  # `tritium describe --json | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("tritium: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("TRITIUM_DEBUG"):
            traceback.print_exc()
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tritium {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the command line reports, it never dumps a traceback
        if os.environ.get("TRITIUM_DEBUG"):
            traceback.print_exc()
        print(f"tritium {args.command}: error: {type(exc).__name__}: {exc} "
              "(set TRITIUM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
