"""Where text comes from: the embedded default corpus and the user's files.

The embedded corpus is the running Python's own standard-library source,
found through ``sysconfig`` -- a few MB of real, varied text (code, comments,
docstrings) that is on every machine that can run tritium, so the tokenizer
and the tiny model train with nothing downloaded.

A *document* is one file (text, source, Markdown) or one record of a JSONL
file (its ``"text"`` field).  The data pipeline splits train/validation by
document and, in doc-aware packing, never lets attention cross documents.
"""
from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

# Default size of the embedded corpus: a few MB trains a vocab-2048 tokenizer in about a second.
DEFAULT_CORPUS_BYTES = 4_000_000
# Files read when a folder is given (other suffixes are skipped: binaries, images, archives).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".toml", ".cfg", ".ini",
                 ".yaml", ".yml", ".html", ".css", ".js", ".sh", ".tex", ".csv")
# stdlib folders skipped: tests are full of odd fixtures, site-packages is not the stdlib.
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3",
              "ensurepip", "encodings", "pydoc_data", "idlelib", "tkinter", "turtledemo"}


def stdlib_dir() -> Path:
    """The running interpreter's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_corpus_files(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """Standard-library ``.py`` files, in a fixed order, totalling about ``max_bytes``.

    The order is sorted by relative path so the same interpreter always gives
    the same corpus (and so the same tokenizer fingerprint).
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = stdlib_dir()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen: list[Path] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        if size == 0 or size > max_bytes:
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    if not chosen:
        raise FileNotFoundError(f"no Python standard-library sources found under {root}; "
                                "pass your own text files with --data")
    return chosen


def _expand(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"input folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            yield from found
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"input not found: {path}")


def iter_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield documents: one per text file, one per JSONL record (its ``"text"`` field).

    Folders are walked (sorted, text suffixes only).  Undecodable bytes are
    replaced rather than failing a long run on one stray file.
    """
    for path in _expand(paths):
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as handle:
                for line_number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        # a data error in the file, not a programming type error
                        raise ValueError(  # noqa: TRY004
                            f"{path}:{line_number}: each JSONL record needs a string 'text' field")
                    if record["text"]:
                        yield record["text"]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text


def resolve_inputs(inputs: Iterable[str | os.PathLike] | None, max_bytes: int = DEFAULT_CORPUS_BYTES
                   ) -> list[Path]:
    """The user's inputs as paths, or the embedded corpus when none are given."""
    inputs = list(inputs or [])
    if not inputs:
        return embedded_corpus_files(max_bytes)
    return [Path(p) for p in inputs]
