"""Shards, manifest and the packed reader: round trips, splits, determinism, rank disjointness, doc masks."""
import json

import numpy as np
import pytest
import torch

from tritium.train.data import IGNORE_INDEX, PackedDataset, prepare_data, read_manifest, token_dtype


def _docs_of(data_dir, split):
    """Documents of a split read straight from the shard files, as token arrays."""
    manifest = read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"])
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.fromfile(data_dir / shard["file"], dtype=dtype)
        starts = np.load(data_dir / shard["docs_file"])
        docs += np.split(tokens, starts[1:])
    return docs


@pytest.fixture
def small_corpus(tmp_path):
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "  gamma", "\tdelta", "ε", "🙂", "\n", "x=1;", "def", "ünïcode"]
    texts = ["".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(40)]
    texts[7] = texts[8]  # a duplicate must land on one side of the split
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def test_prepare_round_trips_documents(tiny_tokenizer, small_corpus, tmp_path):
    path, texts = small_corpus
    manifest = prepare_data([path], tiny_tokenizer, tmp_path / "out", val_fraction=0.2, seed=1, shard_tokens=300)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["fingerprint"] == tiny_tokenizer.fingerprint
    decoded = {}
    for split in ("train", "validation"):
        docs = _docs_of(tmp_path / "out", split)
        info = manifest["splits"][split]
        assert info["docs"] == len(docs) and info["tokens"] == sum(len(d) for d in docs)
        assert len(info["shards"]) >= (2 if split == "train" else 1)  # shard_tokens=300 forces several
        for doc in docs:
            assert doc[0] == tiny_tokenizer.bos_id and doc[-1] == tiny_tokenizer.eos_id
        decoded[split] = [tiny_tokenizer.decode(d) for d in docs]
    assert sorted(decoded["train"] + decoded["validation"]) == sorted(texts)
    assert not set(decoded["train"]) & set(decoded["validation"])  # split by document, duplicates together
    assert 0 < len(decoded["validation"]) < len(texts) / 2


def test_prepare_is_deterministic_and_seeded(tiny_tokenizer, small_corpus, tmp_path):
    path, _ = small_corpus
    a = prepare_data([path], tiny_tokenizer, tmp_path / "a", val_fraction=0.3, seed=0)
    b = prepare_data([path], tiny_tokenizer, tmp_path / "b", val_fraction=0.3, seed=0)
    assert (tmp_path / "a" / "train_00000.bin").read_bytes() == (tmp_path / "b" / "train_00000.bin").read_bytes()
    assert a["splits"] == b["splits"]
    c = prepare_data([path], tiny_tokenizer, tmp_path / "c", val_fraction=0.3, seed=5)
    assert c["splits"]["validation"]["tokens"] != a["splits"]["validation"]["tokens"]
    # re-running into the same folder replaces the earlier output
    again = prepare_data([path], tiny_tokenizer, tmp_path / "a", val_fraction=0.3, seed=5)
    assert again["splits"] == c["splits"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not tritium shards"):
        prepare_data([path], tiny_tokenizer, tmp_path / "d")


class _BigVocab:
    """A stand-in tokenizer whose ids exceed uint16 (one id per character, offset past 65,535)."""
    vocab_size, bos_id, eos_id, fingerprint = 70_000, 1, 2, "big-vocab"

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [66_000 + ord(c) % 4_000 for c in text] + [2] * eos


def test_uint32_when_vocab_does_not_fit(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    (tmp_path / "t.txt").write_text("héllo wörld, a longer document " * 4)
    manifest = prepare_data([tmp_path / "t.txt"], _BigVocab(), tmp_path / "out", val_fraction=0.0)
    assert manifest["dtype"] == "uint32"
    batch = next(PackedDataset(tmp_path / "out", "train", seq_len=16).batches(2))
    assert batch["input_ids"].max() > 65_535 and batch["input_ids"].dtype == torch.int64


def test_windows_are_shifted_slices_of_the_stream(tiny_data_dir):
    ds = PackedDataset(tiny_data_dir, "train", seq_len=37, seed=4)
    stream = np.concatenate(_docs_of(tiny_data_dir, "train")).astype(np.int64)  # one shard at this size
    batch = next(ds.batches(3))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 37)
    for row in range(3):
        ids, labels = batch["input_ids"][row].numpy(), batch["labels"][row].numpy()
        assert np.array_equal(labels[:-1], ids[1:])
        offsets = [o for o in range(0, len(stream) - 37, 37) if np.array_equal(stream[o:o + 37], ids)]
        assert offsets, "every window starts at a multiple of seq_len in the token stream"
        assert labels[-1] == stream[offsets[0] + 37]


def test_deterministic_resumable_and_seeded(tiny_data_dir):
    def rows(ds, n, **kw):
        return torch.cat([b["input_ids"] for b, _ in zip(ds.batches(4, **kw), range(n))])

    ds = PackedDataset(tiny_data_dir, "train", seq_len=32, seed=7, rank=1, world_size=2)
    first = rows(ds, 6)
    assert torch.equal(first, rows(PackedDataset(tiny_data_dir, "train", seq_len=32, seed=7, rank=1,
                                                 world_size=2), 6))
    assert torch.equal(first[4 * 2:], rows(ds, 4, start=2))  # resume after 2 micro-batches
    assert not torch.equal(first, rows(PackedDataset(tiny_data_dir, "train", seq_len=32, seed=8, rank=1,
                                                     world_size=2), 6))


def test_ranks_disjoint_and_epochs_reshuffle(tiny_data_dir):
    world = 3
    sets = [set(PackedDataset(tiny_data_dir, "train", seq_len=64, seed=2, rank=r, world_size=world)
                .windows(0).tolist()) for r in range(world)]
    ds = PackedDataset(tiny_data_dir, "train", seq_len=64, seed=2, rank=0, world_size=world)
    assert all(len(s) == len(ds) for s in sets)
    assert len(set.union(*sets)) == world * len(ds) > ds.num_windows - world
    assert not np.array_equal(ds.windows(0), ds.windows(1))
    # a finite pass covers the epoch exactly once (the partial batch at the end is dropped)
    batches = list(ds.batches(5, epochs=1))
    assert len(batches) == len(ds) // 5 == ds.batches_per_epoch(5)


def test_doc_aware_batches_never_cross_documents(tiny_tokenizer, tiny_data_dir):
    bos = tiny_tokenizer.bos_id
    ds = PackedDataset(tiny_data_dir, "train", seq_len=128, seed=0, doc_aware=True,
                       tokenizer_fingerprint=tiny_tokenizer)
    plain = PackedDataset(tiny_data_dir, "train", seq_len=128, seed=0)
    saw_boundary = False
    for batch, reference in zip(ds.batches(4), plain.batches(4)):
        ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert torch.equal(ids, reference["input_ids"])
        # -100 exactly where the shifted target is the next document's <bos>
        assert torch.equal(labels == IGNORE_INDEX, reference["labels"] == bos)
        assert torch.equal(labels[labels != IGNORE_INDEX], reference["labels"][reference["labels"] != bos])
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == ids.numel()
        assert torch.all(cu[1:] > cu[:-1])
        flat_ids, flat_pos = ids.flatten(), positions.flatten()
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert torch.equal(flat_pos[lo:hi], torch.arange(hi - lo))  # positions restart per document
            assert not (flat_ids[lo + 1:hi] == bos).any()  # a segment never contains another document's start
            assert (lo % 128 == 0) or flat_ids[lo] == bos  # segments start at a row start or a <bos>
        saw_boundary |= len(cu) > ids.shape[0] + 1
        if saw_boundary:
            break
    assert saw_boundary


def test_clear_errors(tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        PackedDataset(tiny_data_dir, "train", seq_len=32, tokenizer_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="world_size"):
        PackedDataset(tiny_data_dir, "validation", seq_len=4096, world_size=1000)
    with pytest.raises(ValueError, match="rank"):
        PackedDataset(tiny_data_dir, "train", seq_len=32, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        PackedDataset(tiny_data_dir, "test", seq_len=32)
    with pytest.raises(FileNotFoundError, match="tritium data prepare"):
        PackedDataset(tmp_path, "train", seq_len=32)
    # a truncated shard is caught before it is read
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_data_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="manifest says"):
        PackedDataset(copy, "train", seq_len=32)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data(None, None, tmp_path / "x", val_fraction=1.0)


def test_val_split_reads_and_texts_come_back(tiny_tokenizer, tiny_data_dir):
    ds = PackedDataset(tiny_data_dir, "val", seq_len=64, shuffle=False)
    first = next(ds.batches(1, epochs=1))["input_ids"][0]
    stream = np.concatenate(_docs_of(tiny_data_dir, "validation"))
    assert np.array_equal(first.numpy(), stream[:64])
    assert tiny_tokenizer.decode(stream[:64]) == tiny_tokenizer.decode(first)
