"""The chat template: how a conversation becomes tokens, and which tokens carry loss.

One template, used identically by SFT/DPO (``tritium.align``) and by the
generator and server (``tritium.serve``), so a model is prompted exactly the
way it was trained.  The token stream of a conversation is::

    <bos> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

* Every message is ``marker + content + <|end|>``; there is no newline
  between turns (the markers already delimit them, and a newline would cost
  a token whose normalisation differs between sentencepiece models).
* The generation prompt is a bare ``<|assistant|>``: the model writes the
  content and stops by emitting ``<|end|>`` (``tokenizer.end_of_turn_id``),
  which the server treats as the stop token.
* Markers are single tokens (the tokenizer registers them as user-defined
  symbols) and are inserted by id, never by encoding their text; each
  content string is encoded on its own.  So the ids come from the template's
  structure, and ``loss_mask`` is built segment by segment while the ids are
  appended -- never by searching the token stream for patterns.

``render_chat`` returns the same template as text, for display and logs.  The
ids of record are ``encode_chat``'s: encoding the rendered string in one go
may split content differently at segment boundaries (sentencepiece's dummy
prefix is added per ``encode`` call).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# The four chat markers, in the order the tokenizer registers them as user-defined symbols.
CHAT_MARKERS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, END)
# role name -> marker that opens its turn
ROLE_MARKERS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES: tuple[str, ...] = tuple(ROLE_MARKERS)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation and return it as a list of ``{"role", "content"}`` dicts.

    Raises TypeError/ValueError naming the offending message index, so a bad
    line in a JSONL file is easy to find.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    checked: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{index}] must be a dict with 'role' and 'content', "
                            f"got {type(message).__name__}")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(f"messages[{index}] is missing {' and '.join(repr(k) for k in missing)}")
        role, content = message["role"], message["content"]
        if role not in ROLE_MARKERS:
            raise ValueError(f"messages[{index}]['role'] must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{index}]['content'] must be a string, got {type(content).__name__}")
        if role == "system" and index != 0:
            raise ValueError(f"messages[{index}]: a 'system' message may only come first")
        for marker in CHAT_MARKERS:
            if marker in content:
                # A marker inside content would be read back as a turn boundary by anyone
                # re-tokenising the rendered text (and by the model, as a stop token).
                raise ValueError(f"messages[{index}]['content'] contains the reserved chat marker {marker!r}")
        checked.append({"role": role, "content": content})
    return checked


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                bos: str = "<s>") -> str:
    """The template as text, token for token what ``encode_chat`` encodes (for display and logs): ``bos``
    (the BOS piece), each message, and with ``add_generation_prompt`` the ``<|assistant|>`` marker --
    the same default as ``encode_chat`` (and Hugging Face's ``apply_chat_template``)."""
    parts = [bos] + [ROLE_MARKERS[m["role"]] + m["content"] + END for m in validate_messages(messages)]
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def marker_ids(tokenizer: Any) -> dict[str, int]:
    """marker text -> token id, with a clear error when the tokenizer lacks a marker."""
    special = getattr(tokenizer, "special_ids", None)
    if not isinstance(special, Mapping):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no 'special_ids' mapping for the chat markers")
    missing = [m for m in CHAT_MARKERS if m not in special]
    if missing:
        raise ValueError(f"tokenizer has no id for chat marker(s) {missing}; train it with the chat markers as "
                         "user-defined symbols (tritium tokenizer train does this)")
    return {marker: int(special[marker]) for marker in CHAT_MARKERS}


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a same-length 0/1 ``loss_mask``.

    ``loss_mask[i] == 1`` means token ``ids[i]`` is a training target: the
    content of every assistant turn and the ``<|end|>`` that closes it (so
    the model learns to stop).  BOS, markers, system/user content and the
    ``<|assistant|>`` marker itself carry no loss.  With the model's
    already-shifted labels this becomes ``labels[t] = ids[t+1] if
    loss_mask[t+1] else -100`` (see ``tritium.align.sft.shifted_labels``).

    ``add_generation_prompt=True`` appends ``<|assistant|>`` (mask 0) for
    inference.
    """
    checked = validate_messages(messages)
    markers = marker_ids(tokenizer)
    ids: list[int] = []
    mask: list[int] = []

    def append(segment: Sequence[int], trained: bool) -> None:
        ids.extend(int(t) for t in segment)
        mask.extend([int(trained)] * len(segment))

    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and bos >= 0:
        append([bos], False)
    for message in checked:
        is_assistant = message["role"] == "assistant"
        append([markers[ROLE_MARKERS[message["role"]]]], False)
        append(tokenizer.encode(message["content"]) if message["content"] else [], is_assistant)
        append([markers[END]], is_assistant)
    if add_generation_prompt:
        append([markers[ASSISTANT]], False)
    return ids, mask


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Ids to prefill for generation: the conversation plus the ``<|assistant|>`` generation prompt."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: ``<|end|>`` first, then EOS when the tokenizer has one."""
    stops = [marker_ids(tokenizer)[END]]
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None and eos >= 0 and eos not in stops:
        stops.append(int(eos))
    return stops
