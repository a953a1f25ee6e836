"""The vocabulary: a sentencepiece BPE tokenizer that round-trips any text exactly.

``train_tokenizer`` learns a byte-fallback BPE model on the embedded corpus
(the Python standard library's source) or on the user's files; ``Tokenizer``
loads it and encodes/decodes.

Exact round trips (``decode(encode(s)) == s`` for every Unicode string) need
four sentencepiece defaults turned off or worked around:

* normalisation: NFKC would rewrite e.g. full-width letters and ``\\u00a0``,
  so the model is trained with the ``identity`` rule;
* ``remove_extra_whitespaces``: would collapse runs of spaces (and strip
  leading/trailing ones) -- fatal for code indentation;
* ``add_dummy_prefix``: would prepend a space to every ``encode`` call, which
  ``decode`` then strips, losing a real leading space;
* the meta symbol ``\\u2581`` ("▁"), which sentencepiece uses to stand for a
  space: a literal "▁" in the input would decode as a space.  ``encode``
  therefore emits a literal "▁" as its three UTF-8 byte pieces, which decode
  back to "▁" rather than to a space.

Characters outside the learned pieces (emoji, rare scripts, control bytes,
newlines, tabs) become ``<0xNN>`` byte pieces, so nothing is unencodable
and ``<unk>`` never appears.

Token ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<pad>``, then
the chat markers ``<|system|> <|user|> <|assistant|> <|end|>`` as
user-defined symbols (single tokens; ``<|end|>`` ends an assistant turn),
then the 256 byte pieces, then the learned merges.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tritium.model.chat import CHAT_MARKERS
from tritium.model.corpus import DEFAULT_CORPUS_BYTES, iter_texts, resolve_inputs

TOKENIZER_FILE = "tokenizer.model"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_META = "\u2581"  # sentencepiece's stand-in for a space
# Smallest useful vocabulary: 4 control tokens + chat markers + 256 bytes + a few merges.
MIN_VOCAB = 4 + len(CHAT_MARKERS) + 256 + 16


def _import_sentencepiece() -> Any:
    try:  # lazy: sentencepiece costs start-up time for commands that never tokenize (tritium --help)
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise ImportError("the tokenizer needs the 'sentencepiece' package: pip install sentencepiece") from exc
    return sentencepiece


def _as_int_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer:
    """A loaded sentencepiece model with the chat markers and exact round trips.

    Build with ``Tokenizer.load(path_or_dir)`` or ``train_tokenizer(...)``.
    """

    def __init__(self, model_bytes: bytes, source: str | None = None) -> None:
        spm = _import_sentencepiece()
        self._model_bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.source = source  # where it was loaded from, for messages
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        # marker text -> id, only for markers this model really has as single pieces
        self.special_ids: dict[str, int] = {}
        for marker in CHAT_MARKERS:
            piece_id = self._sp.piece_to_id(marker)
            if piece_id != self.unk_id and self._sp.id_to_piece(piece_id) == marker:
                self.special_ids[marker] = piece_id
        self.end_of_turn_id: int | None = self.special_ids.get("<|end|>")
        # ids of the three UTF-8 bytes of the meta symbol, when the model has byte pieces
        meta_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
        self._meta_byte_ids = meta_bytes if self.unk_id not in meta_bytes else None
        self.fingerprint: str = hashlib.sha256(self._model_bytes).hexdigest()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.model`` from a file path or from a folder holding one."""
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (train one with `tritium tokenizer train`)")
        try:
            return cls(path.read_bytes(), source=str(path))
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a sentencepiece model: {exc}") from None

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``out_dir/tokenizer.model`` (creating the folder); returns the file path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / TOKENIZER_FILE
        tmp = path.with_suffix(".model.tmp")
        tmp.write_bytes(self._model_bytes)
        os.replace(tmp, path)  # atomic: a reader never sees half a model
        return path

    @property
    def model_bytes(self) -> bytes:
        return self._model_bytes

    # ------------------------------------------------------------------ encode / decode
    def _encode_plain(self, text: str) -> list[int]:
        if _META not in text or self._meta_byte_ids is None:
            return self._sp.encode(text) if text else []
        ids: list[int] = []
        for index, part in enumerate(text.split(_META)):
            if index:
                ids.extend(self._meta_byte_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of ``text`` (optionally framed by bos/eos).

        ``allow_special=False`` encodes chat-marker text found in ``text`` as
        ordinary characters rather than as the marker tokens, for untrusted
        input that must not be able to open or close a turn.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        if allow_special or not any(m in text for m in self.special_ids):
            ids = self._encode_plain(text)
        else:
            ids = []
            for chunk in self._split_markers(text):
                ids.extend(self._encode_plain(chunk))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _split_markers(self, text: str) -> Iterator[str]:
        # Cutting a marker after its first character means no chunk contains a whole marker,
        # so sentencepiece cannot match the user-defined symbol.
        start = 0
        while True:
            hits = [(text.find(m, start), m) for m in self.special_ids]
            hits = [(pos, m) for pos, m in hits if pos >= 0]
            if not hits:
                yield text[start:]
                return
            pos, _marker = min(hits)
            yield text[start:pos + 1]
            start = pos + 1

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        """``encode`` over many texts, using sentencepiece's threads for the common case."""
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if _META not in t]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            encoded = self._sp.encode([texts[i] for i in plain], num_threads=num_threads)
            for i, ids in zip(plain, encoded):
                out[i] = ids
        for i, text in enumerate(texts):
            if _META in text:
                out[i] = self._encode_plain(text)
        for ids in out:
            if bos:
                ids.insert(0, self.bos_id)
            if eos:
                ids.append(self.eos_id)
        return out

    def decode(self, ids: Iterable[int] | Any) -> str:
        """Text of ``ids``; bos/eos/pad decode to nothing, chat markers to their text."""
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} out of range for vocab_size={self.vocab_size}")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r}, "
                f"fingerprint={self.fingerprint[:12]})")


def _training_sentences(inputs: Iterable[str | os.PathLike] | None, max_bytes: int,
                        max_sentences: int) -> list[str]:
    """Non-blank lines of the corpus (sentencepiece trains on lines), capped by count and bytes."""
    sentences: list[str] = []
    total = 0
    for text in iter_texts(resolve_inputs(inputs, max_bytes)):
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            sentences.append(line)
            total += len(line.encode("utf-8", errors="replace"))
            if total >= max_bytes or len(sentences) >= max_sentences:
                return sentences
    return sentences


def train_tokenizer(inputs: Iterable[str | os.PathLike] | None, vocab_size: int,
                    out_dir: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_CORPUS_BYTES,
                    max_sentences: int = 2_000_000, character_coverage: float = 0.9995,
                    num_threads: int | None = None, vocab_flag: str = "--vocab-size") -> Tokenizer:
    """Train a byte-fallback BPE tokenizer; write ``out_dir/tokenizer.model`` when given.

    ``vocab_flag`` is how the caller's user sets the vocabulary size, named in the error when the input
    cannot fill it (``tritium tokenizer train --vocab-size``; ``tritium train`` passes its own).

    ``inputs``: files/folders (text, JSONL with ``"text"``), or None for the
    embedded corpus.  Training reads at most ``max_bytes`` of text and
    ``max_sentences`` lines, which keeps a vocab-2048 model to about a second.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB} (256 byte pieces + specials + merges), "
                         f"got {vocab_size!r}")
    if vocab_size > 1 << 20:
        raise ValueError(f"vocab_size={vocab_size} is implausibly large (max {1 << 20})")
    sentences = _training_sentences(inputs, max_bytes, max_sentences)
    if not sentences:
        raise ValueError("the tokenizer inputs hold no text")
    spm = _import_sentencepiece()
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(CHAT_MARKERS), num_threads=num_threads or min(4, os.cpu_count() or 1),
            minloglevel=2)
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        needed = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if needed:
            raise ValueError(f"vocab_size={vocab_size} is too small: the specials, 256 byte pieces and the "
                             f"input's characters need {needed.group(2)} pieces before any merge; use a larger "
                             f"{vocab_flag}") from None
        at_most = re.search(r"value <= (\d+)", message)
        if at_most:
            raise ValueError(f"vocab_size={vocab_size} is more than {len(sentences)} lines of input can fill "
                             f"(at most {at_most.group(1)}); use a smaller {vocab_flag} or more input") from None
        if "Vocabulary size" in message or "vocab_size" in message:
            raise ValueError(f"cannot learn vocab_size={vocab_size} from {len(sentences)} lines of text: "
                             f"{message}; use a smaller {vocab_flag} or more input") from None
        raise ValueError(f"sentencepiece training failed: {message}") from None
    tokenizer = Tokenizer(buffer.getvalue(), source="trained")
    if out_dir is not None:
        tokenizer.source = str(tokenizer.save(out_dir))
    return tokenizer
