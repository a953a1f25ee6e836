"""Alignment data in the ecosystem's JSONL conventions.

One JSON object per line:

* SFT, chat form:        ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``
* SFT, completion form:  ``{"prompt": "...", "completion": "..."}`` (= one user turn, one assistant turn)
* Preference:            ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; or chat form, where
  ``prompt`` is a list of messages and ``chosen``/``rejected`` are either strings, a list holding the
  assistant reply, or whole conversations (no ``prompt``) that share every message but the last.

A malformed line raises ``ValueError("FILE:LINE: why")``; with ``skip_malformed=True`` it is skipped and
counted in the returned ``ReadStats`` instead (the first few reasons are kept for the log).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tritium.model.chat import validate_messages

T = TypeVar("T")
MAX_KEPT_ERRORS = 5  # reasons kept in ReadStats.errors when skipping


@dataclass
class ReadStats:
    lines: int = 0  # non-blank lines seen
    kept: int = 0  # records parsed and validated
    skipped: int = 0  # malformed records skipped (skip_malformed=True)
    errors: list[str] = field(default_factory=list)  # first few "FILE:LINE: why" messages

    def summary(self) -> str:
        text = f"{self.kept}/{self.lines} records kept"
        if self.skipped:
            text += f", {self.skipped} malformed skipped (first: {self.errors[0]})"
        return text


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # conversation up to (not including) the answer; ends with a user turn
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred assistant reply

    def chosen_messages(self) -> list[dict[str, str]]:
        return self.prompt + [{"role": "assistant", "content": self.chosen}]

    def rejected_messages(self) -> list[dict[str, str]]:
        return self.prompt + [{"role": "assistant", "content": self.rejected}]


def read_jsonl(path: str | Path, parse: Callable[[Any], T], *, skip_malformed: bool = False
               ) -> tuple[list[T], ReadStats]:
    """Parse every non-blank line of ``path`` with ``parse``; errors name the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[T] = []
    stats = ReadStats()
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            stats.lines += 1
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
                records.append(parse(obj))
            except (ValueError, TypeError) as exc:
                message = f"{path}:{line_number}: {exc}"
                if not skip_malformed:
                    raise ValueError(message + " (pass skip_malformed / --skip-malformed to skip bad lines)") \
                        from None
                stats.skipped += 1
                if len(stats.errors) < MAX_KEPT_ERRORS:
                    stats.errors.append(message)
                continue
            stats.kept += 1
    if stats.skipped and os.environ.get("RANK", "0") == "0":  # once, not once per rank
        print(f"{path}: skipped {stats.skipped} malformed line(s) of {stats.lines}; {stats.kept} kept "
              f"(first: {stats.errors[0]})", file=sys.stderr, flush=True)
    return records, stats


# ---------------------------------------------------------------------------------------------- SFT
def parse_sft_record(obj: Any) -> list[dict[str, str]]:
    """One SFT record -> a validated conversation with at least one assistant turn."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = validate_messages(obj["messages"])
    elif "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError("'prompt' and 'completion' must be strings")
        messages = validate_messages([{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": completion}])
    else:
        raise ValueError(f"expected 'messages' or 'prompt'+'completion', got keys {sorted(obj)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn, so nothing to train on")
    return messages


def load_sft_jsonl(path: str | Path, *, skip_malformed: bool = False
                   ) -> tuple[list[list[dict[str, str]]], ReadStats]:
    return read_jsonl(path, parse_sft_record, skip_malformed=skip_malformed)


# ------------------------------------------------------------------------------------ preferences
def _as_reply(value: Any, name: str) -> str:
    """A chosen/rejected value -> the assistant reply text (string, or [..., {"role": "assistant"}])."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        messages = validate_messages(value)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"'{name}' must end with an assistant message")
        return messages[-1]["content"]
    raise TypeError(f"'{name}' must be a string or a non-empty list of messages, got {type(value).__name__}")


def parse_preference_record(obj: Any) -> PreferencePair:
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in ("chosen", "rejected") if key not in obj]
    if missing:
        raise ValueError(f"preference record is missing {missing}")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            prompt_messages = [{"role": "user", "content": prompt}]
        else:
            prompt_messages = validate_messages(prompt)
        # conversational "implicit prompt" in chosen/rejected lists: keep only their final reply
        return PreferencePair(prompt_messages, _as_reply(chosen, "chosen"), _as_reply(rejected, "rejected"))
    # whole conversations: the shared prefix is the prompt
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise TypeError("without 'prompt', 'chosen' and 'rejected' must be whole conversations (lists)")
    chosen_messages, rejected_messages = validate_messages(chosen), validate_messages(rejected)
    if chosen_messages[:-1] != rejected_messages[:-1] or not chosen_messages[:-1]:
        raise ValueError("'chosen' and 'rejected' conversations must share every message but the last")
    return PreferencePair(chosen_messages[:-1], _as_reply(chosen, "chosen"), _as_reply(rejected, "rejected"))


def load_preference_jsonl(path: str | Path, *, skip_malformed: bool = False
                          ) -> tuple[list[PreferencePair], ReadStats]:
    return read_jsonl(path, parse_preference_record, skip_malformed=skip_malformed)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path
