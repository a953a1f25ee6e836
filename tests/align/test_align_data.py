"""JSONL readers (errors with line numbers, skip-and-count) and the embedded tasks (splits, verifiers)."""
from __future__ import annotations

import json

import pytest

from tritium.align.data import load_preference_jsonl, load_sft_jsonl, write_jsonl
from tritium.align.tasks import TASKS, make_splits, preference_pairs


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sft_formats_and_blank_lines(tmp_path):
    path = _write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        "",
        json.dumps({"prompt": "p", "completion": "c"}),
    ])
    records, stats = load_sft_jsonl(path)
    assert records[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert (stats.lines, stats.kept, stats.skipped) == (2, 2, 0)


@pytest.mark.parametrize("bad, why", [
    ("{not json", "invalid JSON"),
    (json.dumps({"text": "x"}), "expected 'messages'"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
    (json.dumps([1, 2]), "JSON object"),
])
def test_malformed_sft_line_names_file_and_line(tmp_path, bad, why):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = _write_lines(tmp_path / "sft.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError) as info:
        load_sft_jsonl(path)
    assert "sft.jsonl:3:" in str(info.value) and why in str(info.value)
    records, stats = load_sft_jsonl(path, skip_malformed=True)
    assert len(records) == 3 and stats.skipped == 1 and ":3:" in stats.errors[0]
    assert "1 malformed skipped" in stats.summary()


def test_preference_forms(tmp_path):
    convo = [{"role": "user", "content": "q"}]
    path = _write_lines(tmp_path / "pref.jsonl", [
        json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}),
        json.dumps({"prompt": convo, "chosen": [{"role": "assistant", "content": "good"}],
                    "rejected": [{"role": "assistant", "content": "bad"}]}),
        json.dumps({"chosen": convo + [{"role": "assistant", "content": "good"}],
                    "rejected": convo + [{"role": "assistant", "content": "bad"}]}),
        json.dumps({"prompt": "q", "chosen": "good"}),
        json.dumps({"chosen": convo + [{"role": "assistant", "content": "good"}],
                    "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}),
    ])
    with pytest.raises(ValueError, match=r"pref.jsonl:4: .*missing \['rejected'\]"):
        load_preference_jsonl(path)
    pairs, stats = load_preference_jsonl(path, skip_malformed=True)
    assert stats.skipped == 2 and ":5:" in stats.errors[1]
    for pair in pairs:
        assert (pair.prompt, pair.chosen, pair.rejected) == (convo, "good", "bad")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft_jsonl(tmp_path / "nope.jsonl")


def test_splits_deterministic_disjoint_and_verified():
    a, b, c = make_splits(seed=3, per_task=60), make_splits(seed=3, per_task=60), make_splits(seed=4, per_task=60)
    assert a == b and a != c
    prompts = {name: {ex.prompt for ex in split} for name, split in a.items()}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["val"])
    assert not (prompts["val"] & prompts["test"])
    assert {ex.task for ex in a["test"]} == set(TASKS)
    for ex in a["train"] + a["test"]:
        assert ex.verify(ex.answer) and ex.verify(f" {ex.answer} ") and not ex.verify(ex.answer + " x")
    # spot-check answers against an independent computation
    for ex in a["train"]:
        body = ex.prompt.split(": ", 1)[1]
        if ex.task == "add":
            x, y = body.split(" + ")
            assert int(ex.answer) == int(x) + int(y)
        elif ex.task == "sort":
            assert ex.answer.split() == sorted(body.split(), key=int)
        elif ex.task == "reverse":
            assert ex.answer.split() == body.split()[::-1]
        else:
            assert ex.answer == str(eval(body, {"__builtins__": {"max": max, "min": min, "len": len}}))


def test_preference_pairs_reject_unverified_answers():
    split = make_splits(seed=0, per_task=40)["train"]
    pairs = preference_pairs(split, seed=1)
    assert pairs == preference_pairs(split, seed=1)
    for example, pair in zip(split, pairs):
        assert pair.chosen == example.answer and not example.verify(pair.rejected)
        assert pair.prompt == [{"role": "user", "content": example.prompt}]
    assert any(p.rejected.startswith(p.chosen + " ") for p in pairs)  # some rambling ones


def test_write_jsonl_roundtrip(tmp_path):
    split = make_splits(seed=0, per_task=20)["val"]
    path = write_jsonl(tmp_path / "d.jsonl", [ex.to_json() for ex in split])
    records, _ = load_sft_jsonl(path)
    assert [r[-1]["content"] for r in records] == [ex.answer for ex in split]
