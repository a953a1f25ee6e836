"""Retrieval augmentation: chunking, BM25 ranking against a from-the-formula reference, the injected
template, and a server that reports its sources."""
from __future__ import annotations

import math
import random

import httpx
import pytest
from serve_harness import running_server, tiny_tokenizer

from tritium.serve.retrieval import (
    CONTEXT_HEADER,
    DocIndex,
    augment_messages,
    augment_prompt,
    format_context,
    split_text,
    tokenize_words,
)

DOCS = {
    "ops/runbook.md": "# Runbook\n\nRestart the zorblax service with `systemctl restart zorblax`.\n\n"
                      "The zorblax frequency is 42 hertz.",
    "faq.txt": "Our office opens at nine.\n\nLunch is served at noon in the cafeteria.",
    "notes/ignored.pdf": "zorblax zorblax zorblax (not a text file, never indexed)",
}


@pytest.fixture()
def docs_dir(tmp_path):
    for name, text in DOCS.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def bm25_reference(corpus: list[list[str]], query: list[str], k1=1.5, b=0.75) -> list[float]:
    """Okapi BM25 from the formula, with Lucene's idf log(1 + (N - df + 0.5) / (df + 0.5))."""
    n = len(corpus)
    avgdl = sum(map(len, corpus)) / n
    df = {}
    for doc in corpus:
        for word in set(doc):
            df[word] = df.get(word, 0) + 1
    idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
    scores = []
    for doc in corpus:
        score = 0.0
        for q in query:
            tf = doc.count(q)
            score += idf.get(q, 0.0) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(score)
    return scores


def test_split_text_bounds_sizes_and_keeps_all_words():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(600)]
    paragraphs, pos = [], 0
    while pos < len(words):
        size = rng.randint(1, 90)
        paragraphs.append(" ".join(words[pos:pos + size]))
        pos += size
    text = "\n\n".join(paragraphs)
    for chunk_chars, overlap in ((50, 0), (123, 20), (400, 100)):
        chunks = split_text(text, chunk_chars, overlap)
        assert all(0 < len(c) <= chunk_chars for c in chunks)
        seen = [w for c in chunks for w in c.split()]
        assert set(seen) == set(words)  # nothing lost
        if overlap == 0:
            assert seen == words  # and, without overlap, nothing repeated or reordered
    with pytest.raises(ValueError, match="overlap"):
        split_text(text, 10, 10)


def test_index_ranks_like_bm25_reference_and_reports_sources(docs_dir):
    index = DocIndex.from_dir(docs_dir, chunk_chars=80, overlap_chars=0)
    assert index.sources == ["faq.txt", "ops/runbook.md"]  # .pdf skipped, nested folders found
    corpus = [tokenize_words(c.text) for c in index.chunks]
    for query in ("what is the zorblax frequency", "when is lunch served", "restart service"):
        reference = bm25_reference(corpus, tokenize_words(query))
        got = index._bm25.get_scores(tokenize_words(query))
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(got, reference))
        hits = index.search(query, k=2)
        best = max(range(len(corpus)), key=lambda i: (reference[i], -i))
        assert hits[0].chunk == index.chunks[best]
    assert index.search("zorblax frequency", 1)[0].chunk.source == "ops/runbook.md"
    assert index.search("cafeteria", 3)[0].chunk.source == "faq.txt"
    assert index.search("quantum chromodynamics", 3) == []  # no shared word, nothing injected
    with pytest.raises(FileNotFoundError):
        DocIndex.from_dir(docs_dir / "missing")
    (docs_dir / "empty").mkdir()
    with pytest.raises(ValueError, match="no text"):
        DocIndex.from_dir(docs_dir / "empty")


def test_template_injection(docs_dir):
    index = DocIndex.from_dir(docs_dir)
    hits = index.search("zorblax lunch", 2)
    block = format_context(hits)
    assert block.startswith(CONTEXT_HEADER)
    for n, hit in enumerate(hits, 1):
        assert f"[{n}] ({hit.chunk.source})\n{hit.chunk.text}" in block
    messages = [{"role": "user", "content": "hi"}]
    assert augment_messages(messages, hits) == [{"role": "system", "content": block}, *messages]
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert augment_messages(with_system, hits)[0]["content"] == f"{block}\n\nBe brief."
    assert augment_prompt("Q: hi", hits) == f"{block}\n\nQ: hi"
    assert augment_messages(messages, []) is messages and augment_prompt("x", []) == "x"


def test_server_injects_context_and_reports_sources(docs_dir):
    from tritium.model.chat import encode_prompt
    from tritium.serve.api import ServeConfig

    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "What is the zorblax frequency?"}]
    # small chunks: the tiny test tokenizer spends about a token per character
    config = ServeConfig(docs_dir=str(docs_dir), retrieval_top_k=1, retrieval_chunk_chars=60, max_tokens_cap=4)
    index = DocIndex.from_dir(docs_dir, chunk_chars=60)
    with running_server(config) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).json()
        assert [s["source"] for s in body.get("sources", [])] == ["ops/runbook.md"], body
        assert "frequency" in index.chunks[[c.source for c in index.chunks].index("ops/runbook.md")
                                           + body["sources"][0]["chunk"]].text
        expected_ids = encode_prompt(tok, augment_messages(messages, index.search(messages[0]["content"], 1)))
        assert body["usage"]["prompt_tokens"] == len(expected_ids)
        off = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                        "retrieval": False}).json()
        assert "sources" not in off and off["usage"]["prompt_tokens"] == len(encode_prompt(tok, messages))
        r = client.post("/v1/completions", json={"prompt": "lunch at the cafeteria", "max_tokens": 2,
                                                 "stream": True})
        assert '"sources":[{"source":"faq.txt"' in r.text
