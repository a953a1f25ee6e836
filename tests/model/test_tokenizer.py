"""The sentencepiece tokenizer: exact round trips, special tokens, training on user files."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tritium.model.chat import CHAT_MARKERS
from tritium.model.corpus import embedded_corpus_files, iter_texts
from tritium.model.tokenizer import Tokenizer, train_tokenizer

# Characters sentencepiece is tempted to rewrite: spaces of every kind, its meta symbol, controls, markers.
TRICKY = [" ", "  ", "\t", "\n", "\r", "\u2581", "\u00a0", "\u3000", "\ufeff", "\x00", "\u200b", "<|end|>",
          "<|user|>", "<s>", "</s>", "<unk>", "<0x41>", "é", "e\u0301", "ﬁ", "Ａ", "🙂", "中文", "def", "x"]

round_trip_settings = settings(max_examples=300, deadline=None, derandomize=True,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("text", [
    "", " ", "   leading", "trailing   ", "a  b   c", "\n\n\tdef f(x):\n        return x\n", "\t\t", "\r\n",
    "\u2581", "a\u2581b", " \u2581 \u2581\u2581", "ﬁ Ａ \u00a0\u3000", "e\u0301 vs é", "🙂🙃 中文 العربية",
    "<|user|>hi<|end|><|assistant|>", "<s>not bos</s>", "\x00\x01\x7f",
])
def test_round_trip_examples(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_id not in ids


@round_trip_settings
@given(text=st.text(max_size=200))
def test_round_trip_any_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


@round_trip_settings
@given(parts=st.lists(st.sampled_from(TRICKY), max_size=30))
def test_round_trip_whitespace_and_specials(tiny_tokenizer, parts):
    text = "".join(parts)
    ids = tiny_tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == tiny_tokenizer.bos_id and ids[-1] == tiny_tokenizer.eos_id
    assert tiny_tokenizer.decode(ids) == text
    plain = tiny_tokenizer.encode(text, allow_special=False)
    assert tiny_tokenizer.decode(plain) == text
    assert not set(plain) & set(tiny_tokenizer.special_ids.values())


def test_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert list(tok.special_ids) == list(CHAT_MARKERS)
    assert len(set(tok.special_ids.values())) == 4
    for marker, token_id in tok.special_ids.items():
        assert tok.encode(marker) == [token_id]
        assert tok.decode([token_id]) == marker
    assert tok.end_of_turn_id == tok.special_ids["<|end|>"]
    assert tok.decode([tok.bos_id, tok.eos_id, tok.pad_id]) == ""
    assert tok.vocab_size == len(tok) == 2048


def test_learns_merges_and_batches(tiny_tokenizer):
    texts = list(iter_texts(embedded_corpus_files(max_bytes=60_000)))[-3:]
    batch = tiny_tokenizer.encode_batch(texts + ["a\u2581b"], bos=True)
    for text, ids in zip(texts + ["a\u2581b"], batch):
        assert ids == tiny_tokenizer.encode(text, bos=True)
    total_chars = sum(len(t) for t in texts)
    assert sum(len(ids) for ids in batch[:-1]) < 0.5 * total_chars  # merges learned, not byte soup


def test_save_load_fingerprint(tiny_tokenizer, tmp_path):
    path = tiny_tokenizer.save(tmp_path / "copy")
    assert path.name == "tokenizer.model"
    loaded = Tokenizer.load(tmp_path / "copy")
    assert loaded.fingerprint == tiny_tokenizer.fingerprint == Tokenizer.load(path).fingerprint
    assert loaded.encode("hello world") == tiny_tokenizer.encode("hello world")


def test_train_on_user_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\xff\x00" * 10)
    rows = [{"text": f"record {i}: Ünïcödé and  spaces\twith tabs"} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([tmp_path / "docs", tmp_path / "c.jsonl"], 300)
    with pytest.raises(ValueError, match="smaller --vocab-size"):
        train_tokenizer([tmp_path / "docs", tmp_path / "c.jsonl"], 5000)
    tok = train_tokenizer([tmp_path / "docs", tmp_path / "c.jsonl"], 400, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert tok.vocab_size == 400 and list(tok.special_ids) == list(CHAT_MARKERS)
    for text in ["the quick brown fox", "record 7: Ünïcödé and  spaces\twith tabs", "zzz 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    other = train_tokenizer([tmp_path / "docs"], 350)
    assert other.fingerprint != tok.fingerprint


def test_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(None, 100, tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"], 300)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        tiny_tokenizer.decode([5, 99_999])
    with pytest.raises(TypeError):
        tiny_tokenizer.encode(b"bytes")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_texts([bad]))


def test_embedded_corpus_is_deterministic_stdlib_source():
    files = embedded_corpus_files(max_bytes=200_000)
    assert files == embedded_corpus_files(max_bytes=200_000)
    assert all(f.suffix == ".py" for f in files)
    total = sum(f.stat().st_size for f in files)
    assert 200_000 <= total < 200_000 + max(f.stat().st_size for f in files)
