"""Tokens on disk and back: binary shards with a manifest, and a packed, sharded reader.

``prepare_data`` tokenizes documents (``tritium.model.corpus.iter_texts``:
files, JSONL records) as ``<bos> text <eos>``, splits train/validation *by
document* (a hash of the text and the seed, so the split does not depend on
file order and duplicates never straddle it), and writes per split:

* ``{split}_{i:05d}.bin``: the token stream, ``uint16`` when the vocabulary
  fits in 65,536 ids, else ``uint32`` (raw little-endian, memory-mappable);
* ``{split}_{i:05d}.docs.npy``: int64 offset of each document's first token;
* ``manifest.json`` (written last, so a half-written folder has none): dtype,
  counts, the tokenizer's fingerprint and vocabulary size, the shard list.

``PackedDataset`` memory-maps the shards and cuts them into windows of
``seq_len + 1`` tokens (inputs = window[:-1], labels = window[1:]: labels are
already shifted, as ``Transformer.forward`` expects).  Windows are shuffled
per epoch from ``(seed, epoch)`` and dealt round-robin to ranks, so every
rank sees a disjoint slice and the same ``(seed, rank, world_size)`` always
gives the same batches; ``batches(start=k)`` resumes after ``k`` micro-batches.

In doc-aware mode a batch also carries ``cu_seqlens`` (int32 boundaries of the
documents in the flattened ``B*T`` tokens) and ``position_ids`` restarting at
each document, so varlen attention never crosses a document, and the label of
the last token of each document is -100 (predicting the next document's
``<bos>`` from this one is noise).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritium.model.corpus import DEFAULT_CORPUS_BYTES, iter_texts, resolve_inputs

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation"}
IGNORE_INDEX = -100
# Documents tokenized per sentencepiece call (its threads share the batch).
_ENCODE_BATCH = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _split_of(text: str, seed: int, val_fraction: float) -> tuple[str, float]:
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8", errors="replace")).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64  # uniform in [0, 1)
    return ("validation" if u < val_fraction else "train"), u


class _ShardWriter:
    """Appends documents to ``{split}_{i:05d}.bin`` files of about ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._handle = None
        self._tokens = 0
        self._doc_starts: list[int] = []

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}"
        self.shards.append({"file": f"{name}.bin", "docs_file": f"{name}.docs.npy", "tokens": 0, "docs": 0})
        self._handle = open(self.out_dir / f"{name}.bin", "wb")  # noqa: SIM115 - open across many write() calls
        self._tokens = 0
        self._doc_starts = []

    def write(self, ids: list[int]) -> None:
        if self._handle is None or self._tokens >= self.shard_tokens:
            self.close()
            self._open()
        self._doc_starts.append(self._tokens)
        self._handle.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._tokens += len(ids)

    def close(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        np.save(self.out_dir / self.shards[-1]["docs_file"], np.asarray(self._doc_starts, dtype=np.int64))
        self.shards[-1].update(tokens=self._tokens, docs=len(self._doc_starts))


def prepare_data(inputs: Iterable[str | os.PathLike] | None, tokenizer: Any, out_dir: str | os.PathLike,
                 val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 1 << 27,
                 max_bytes: int = DEFAULT_CORPUS_BYTES) -> dict[str, Any]:
    """Tokenize ``inputs`` (None = embedded corpus) into shards + ``manifest.json`` in ``out_dir``.

    Returns the manifest.  ``val_fraction`` of the documents (at least one when
    there are two or more and the fraction is positive) go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens!r}")
    for attribute in ("encode", "fingerprint", "vocab_size", "bos_id", "eos_id"):
        if not hasattr(tokenizer, attribute):
            raise TypeError(f"tokenizer must be a tritium.model.tokenizer.Tokenizer (missing {attribute!r})")
    out = Path(out_dir)
    _clear_previous(out)
    paths = resolve_inputs(inputs, max_bytes)

    # Pass 1: decide each document's split from its text alone.
    splits: list[str] = []
    scores: list[float] = []
    for text in iter_texts(paths):
        split, score = _split_of(text, seed, val_fraction)
        splits.append(split)
        scores.append(score)
    if not splits:
        raise ValueError("the data inputs hold no text")
    if val_fraction > 0 and len(splits) >= 2 and "validation" not in splits:
        splits[int(np.argmin(scores))] = "validation"  # the document closest to the cut

    # Pass 2: tokenize and write, in input order.
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    batch: list[str] = []
    index = 0

    def flush() -> None:
        nonlocal index
        if hasattr(tokenizer, "encode_batch"):  # sentencepiece encodes a batch on several threads
            encoded = tokenizer.encode_batch(batch, bos=True, eos=True)
        else:
            encoded = [tokenizer.encode(text, bos=True, eos=True) for text in batch]
        for ids in encoded:
            writers[splits[index]].write(ids)
            index += 1
        batch.clear()

    for text in iter_texts(paths):
        batch.append(text)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    flush()
    for writer in writers.values():
        writer.close()

    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "source": getattr(tokenizer, "source", None)},
        "inputs": [str(p) for p in paths] if inputs else "embedded corpus (Python stdlib source)",
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": {split: {"tokens": sum(s["tokens"] for s in w.shards), "docs": sum(s["docs"] for s in w.shards),
                           "shards": w.shards} for split, w in writers.items()},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _clear_previous(out: Path) -> None:
    """Make ``out`` ready: create it, or replace an earlier ``prepare_data`` output; never clobber other files."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if p.name in (MANIFEST, MANIFEST + ".tmp")
            or (p.name.startswith(SPLITS) and p.name.endswith((".bin", ".docs.npy")))]
    others = [p.name for p in out.iterdir() if p not in ours and p.name != "tokenizer.model"]
    if others:
        raise FileExistsError(f"--out {out} already holds files that are not tritium shards "
                              f"({', '.join(sorted(others)[:3])}...); choose an empty folder")
    for path in ours:
        path.unlink()


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}; run `tritium data prepare --out {data_dir}` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                         "re-run `tritium data prepare`")
    return manifest


def check_tokenizer(manifest: dict[str, Any], fingerprint: str, data_dir: Any = "") -> None:
    """Raise a clear ValueError when the shards were made with a different tokenizer."""
    expected = manifest["tokenizer"]["fingerprint"]
    if fingerprint != expected:
        raise ValueError(f"tokenizer mismatch: the shards in {data_dir} were tokenized with tokenizer "
                         f"{expected[:12]} (vocab {manifest['tokenizer']['vocab_size']}), but the given tokenizer "
                         f"is {fingerprint[:12]}; re-run `tritium data prepare` with this tokenizer")


class PackedDataset:
    """Fixed-length packed windows of a prepared split, deterministic per (seed, rank, world_size).

    Args:
        data_dir: folder written by ``prepare_data``.
        split: "train" or "validation" ("val").
        seq_len: tokens per sequence (each window reads ``seq_len + 1`` for the shifted labels).
        seed: shuffle seed; epoch ``e`` uses the permutation drawn from ``(seed, e)``.
        rank, world_size: this process's slice; ranks get disjoint windows and equal counts.
        tokenizer_fingerprint: when given (a string, or a Tokenizer), must match the manifest.
        doc_aware: add ``cu_seqlens``/``position_ids`` and mask cross-document labels.
        shuffle: False reads windows in order (e.g. a fixed validation pass).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", seq_len: int = 256, seed: int = 0,
                 rank: int = 0, world_size: int = 1, tokenizer_fingerprint: Any = None, doc_aware: bool = False,
                 shuffle: bool = True) -> None:
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.data_dir = Path(data_dir)
        self.split = _SPLIT_ALIASES[split]
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.doc_aware, self.shuffle = doc_aware, shuffle
        self.manifest = read_manifest(self.data_dir)
        if tokenizer_fingerprint is not None:
            fingerprint = getattr(tokenizer_fingerprint, "fingerprint", tokenizer_fingerprint)
            check_tokenizer(self.manifest, fingerprint, self.data_dir)
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        dtype = np.dtype(self.manifest["dtype"])

        self._tokens: list[np.memmap] = []
        self._doc_starts: list[np.ndarray] = []
        shard_ids, offsets = [], []
        for shard in self.manifest["splits"][self.split]["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
            if path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"shard {path} holds {path.stat().st_size} bytes, the manifest says "
                                 f"{shard['tokens']} {dtype.name} tokens; re-run `tritium data prepare`")
            if shard["tokens"] == 0:
                continue
            self._tokens.append(np.memmap(path, dtype=dtype, mode="r"))
            self._doc_starts.append(np.load(self.data_dir / shard["docs_file"]))
            count = (shard["tokens"] - 1) // seq_len
            shard_ids.append(np.full(count, len(self._tokens) - 1, dtype=np.int32))
            offsets.append(np.arange(count, dtype=np.int64) * seq_len)
        self._window_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._window_offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.num_windows = len(self._window_offset)
        # every rank gets the same count; up to world_size-1 windows per epoch are left out
        self.sequences_per_rank = self.num_windows // world_size
        if self.sequences_per_rank == 0:
            raise ValueError(f"the {self.split} split of {self.data_dir} has {self.num_windows} windows of "
                             f"seq_len={seq_len}+1 tokens, fewer than world_size={world_size}; use a shorter "
                             "seq_len or more data")
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Sequences this rank reads per epoch."""
        return self.sequences_per_rank

    def batches_per_epoch(self, micro_batch: int) -> int:
        return self.sequences_per_rank // micro_batch

    def windows(self, epoch: int) -> np.ndarray:
        """Indices of the windows this rank reads in ``epoch``, in order (disjoint across ranks)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._epoch_cache = (epoch, order[self.rank::self.world_size][:self.sequences_per_rank])
        return self._epoch_cache[1]

    def sequence(self, index: int) -> dict[str, np.ndarray]:
        """The ``index``-th sequence of this rank's stream (epochs concatenated), as numpy arrays."""
        epoch, within = divmod(index, self.sequences_per_rank)
        window = int(self.windows(epoch)[within])
        shard, start = int(self._window_shard[window]), int(self._window_offset[window])
        tokens = np.asarray(self._tokens[shard][start:start + self.seq_len + 1], dtype=np.int64)
        item = {"input_ids": tokens[:-1], "labels": tokens[1:].copy()}
        if self.doc_aware:
            starts = self._doc_starts[shard]
            lo, hi = np.searchsorted(starts, [start + 1, start + self.seq_len + 1])
            # relative positions 1..seq_len where a new document begins
            boundaries = starts[lo:hi] - start
            item["labels"][boundaries - 1] = IGNORE_INDEX
            segment_starts = np.concatenate([[0], boundaries[boundaries < self.seq_len]])
            item["segment_starts"] = segment_starts
        return item

    def batches(self, micro_batch: int, start: int = 0, epochs: int | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro-batches forever (or for ``epochs``), resuming after ``start`` micro-batches.

        Keys: ``input_ids``, ``labels`` (B, T) int64; doc-aware adds
        ``cu_seqlens`` (num_segments + 1,) int32 over the flattened ``B*T``
        tokens and ``position_ids`` (B, T) int64.
        """
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start!r}")
        if epochs is not None and epochs * self.sequences_per_rank < micro_batch:
            raise ValueError(f"{self.split}: {epochs} epoch(s) of {self.sequences_per_rank} sequences per rank "
                             f"cannot fill one micro-batch of {micro_batch}")
        end = None if epochs is None else epochs * self.sequences_per_rank
        index = start * micro_batch
        while end is None or index + micro_batch <= end:
            items = [self.sequence(index + i) for i in range(micro_batch)]
            index += micro_batch
            yield self._collate(items)

    def _collate(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": torch.from_numpy(np.stack([it["input_ids"] for it in items])),
                 "labels": torch.from_numpy(np.stack([it["labels"] for it in items]))}
        if self.doc_aware:
            T = self.seq_len
            cu, positions = [], np.empty((len(items), T), dtype=np.int64)
            for row, item in enumerate(items):
                seg = item["segment_starts"]
                cu.extend((row * T + seg).tolist())
                lengths = np.diff(np.append(seg, T))
                positions[row] = np.arange(T) - np.repeat(seg, lengths)
            cu.append(len(items) * T)
            batch["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
            batch["position_ids"] = torch.from_numpy(positions)
        return batch
