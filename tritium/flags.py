"""One flag vocabulary across commands, and the old spellings kept for one release.

Every concept has one flag name in every command (``--data`` for input text
or JSONL, ``--corpus-bytes`` for the embedded-corpus cap, ``--checkpoint`` for
the model a command starts from, ``--max-tokens`` for output length as in the
OpenAI API, ``--requests-per-s`` for traffic, ``--prompt-tokens`` counted in
tokens).  A renamed flag keeps its old spelling as a hidden alias that still
works and prints one warning naming the new flag; aliases go in the release
after the one that renamed them.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

# old spelling -> new spelling, for every command (the table tests and the README refer to)
RENAMED: dict[str, str] = {
    "--input": "--data",
    "--max-bytes": "--corpus-bytes",
    "--init-from": "--checkpoint",
    "--max-new-tokens": "--max-tokens",
    "--output-tokens": "--max-tokens",
    "--traffic-rps": "--requests-per-s",
    "--reference": "--reference-checkpoint",  # align-eval only: dpo's --reference is a mode and keeps its name
}


class _DeprecatedAlias(argparse.Action):
    """Stores like the new flag, after a warning on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated_alias(parser: argparse.ArgumentParser | Any, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (stored in ``dest``; ``kwargs`` as for ``new``: type, nargs)."""
    kwargs.pop("help", None)
    kwargs.pop("default", None)
    kwargs.pop("required", None)
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)
