"""Shared fixtures for the alignment tests: a character-level stand-in tokenizer.

It has the interface of ``tritium.model.tokenizer.Tokenizer`` that the chat
template and the alignment code use (encode/decode, bos/eos/pad ids, the chat
markers in ``special_ids``) with one token per character, so tests can state
exact token positions by counting characters.
"""
from __future__ import annotations

import pytest

from tritium.model.chat import CHAT_MARKERS

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*/%()[],.=?:'_\n"


class CharTokenizer:
    """ids: 0 pad, 1 bos, 2 eos, 3..6 chat markers, then one id per character of ALPHABET."""

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.special_ids = {marker: 3 + i for i, marker in enumerate(CHAT_MARKERS)}
        self.end_of_turn_id = self.special_ids["<|end|>"]
        self._offset = 3 + len(CHAT_MARKERS)
        self._char_to_id = {c: self._offset + i for i, c in enumerate(ALPHABET)}
        self.vocab_size = self._offset + len(ALPHABET)
        self.fingerprint = "char-tokenizer"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self._char_to_id[c] for c in text.lower()]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        id_to_marker = {v: k for k, v in self.special_ids.items()}
        out = []
        for i in ids:
            i = int(i)
            if i in id_to_marker:
                out.append(id_to_marker[i])
            elif i >= self._offset:
                out.append(ALPHABET[i - self._offset])
        return "".join(out)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
