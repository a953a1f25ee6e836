"""Token ids -> text, one token at a time, without ever emitting text that has to be taken back.

Two hazards make "decode the new token and print it" wrong:

* Byte fallback: a character outside the vocabulary is spelled as several
  byte tokens (``<0xE2><0x82><0xAC>`` for "€").  Until the last byte arrives
  the decoder renders U+FFFD, so a delta ending in U+FFFD is held back.
* Context: sentencepiece drops the leading space of the first piece it
  decodes, so decoding a token alone loses the space in front of a word.
  Deltas come from decoding a short window that starts a few tokens back
  (the prefix/read offsets of Hugging Face's TextStreamer and vLLM) and
  subtracting the window's previously decoded text.

``TextTracker`` adds stop strings on top: the text is cut right before the
first stop string, and a tail that could still grow into a stop string is
held back, so the concatenated stream always equals the final text.
"""
from __future__ import annotations

import re
import weakref
from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes ``token_id`` contributes to decoded text (what logprobs' ``bytes`` report).

    A sentencepiece byte-fallback piece ``<0xC3>`` is the single byte 0xC3 -- decoding it alone would
    render U+FFFD -- so the bytes of a completion's tokens concatenate to the UTF-8 of its text.  Other
    pieces are decoded alone (tritium's tokenizers keep every space: no dummy prefix, no whitespace
    folding); control tokens (bos/eos/pad) contribute nothing, ids past the tokenizer nothing either.
    """
    if not 0 <= token_id < getattr(tokenizer, "vocab_size", token_id + 1):
        return b""
    piece = tokenizer.id_to_piece(token_id) if hasattr(tokenizer, "id_to_piece") else None
    match = _BYTE_PIECE.fullmatch(piece) if isinstance(piece, str) else None
    if match:
        return bytes([int(match.group(1), 16)])
    return tokenizer.decode([token_id]).encode("utf-8")


def bytes_to_token_text(data: bytes) -> str:
    """A token's ``token`` string: its text, or OpenAI's ``bytes:\\xc3`` form when its bytes are not
    whole UTF-8 characters (one byte of a multi-byte character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


# tokenizer -> {token id: its text decoded alone}. In the steady state every add() decodes the previous
# token alone (the window it subtracts), so that half of the decoding is a dict lookup.
_SINGLE_TOKEN_TEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _single_token_texts(tokenizer) -> dict[int, str] | None:
    try:
        return _SINGLE_TOKEN_TEXT.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: decode every time
        return None


class IncrementalDetokenizer:
    """Feeds token ids, returns text deltas; ``flush()`` returns whatever was held back."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._single = _single_token_texts(tokenizer)
        # The completion is decoded on its own (as the final text is), so the window starts at its
        # first token; it then trails one token-window behind the newest token.
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        if len(ids) == 1 and self._single is not None:
            text = self._single.get(ids[0])
            if text is None:
                text = self._single[ids[0]] = self.tokenizer.decode(ids)
            return text
        return self.tokenizer.decode(ids)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR) \
                and new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished byte sequence at the end renders as U+FFFD)."""
        full = self.tokenizer.decode(self.ids)
        if full.startswith(self.text):
            delta = full[len(self.text):]
        else:  # a window decoded differently from the whole; never take text back, append the tail
            delta = self.tokenizer.decode(self.ids[self.read_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


def _held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextTracker:
    """Detokenizes a completion and applies stop strings.

    ``add(token_id)`` -> (text_delta, stopped). ``text`` is what has been emitted; after a stop string it
    ends right before the stop string and ``stopped`` is True.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = tuple(stop)
        self.pending = ""  # decoded but not yet emitted (possible start of a stop string)
        self.text = ""
        self.stopped = False

    def _release(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.pending += new
        if self.stop:
            # Searching only ``pending`` suffices: emitted text never ends in a proper prefix of a stop
            # string (that tail is held back), so no stop string can start inside it.
            first = -1
            for stop in self.stop:
                index = self.pending.find(stop)
                if index != -1 and (first == -1 or index < first):
                    first = index
            if first != -1:
                delta = self.pending[:first]
                self.pending = ""
                self.text += delta
                self.stopped = True
                return delta
        keep = 0 if final else _held_back_length(self.pending, self.stop)
        delta = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        self.text += delta
        return delta

    def add(self, token_id: int) -> tuple[str, bool]:
        return self._release(self.detok.add(token_id), final=False), self.stopped

    def finish(self) -> str:
        """Emit everything still held back (call when generation ends for a reason other than a stop
        string)."""
        return self._release(self.detok.flush(), final=True)
