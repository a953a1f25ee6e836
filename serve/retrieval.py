"""Retrieval augmentation: fresh and private knowledge at run time, without retraining.

``DocIndex.from_dir(DIR)`` reads every ``.txt`` and ``.md`` file under DIR,
splits each into chunks of about ``chunk_chars`` characters (on paragraph
boundaries where possible, with a small overlap so a fact cut at a boundary
survives in one piece) and indexes them with BM25 (the ``rank_bm25`` package),
the well-tried lexical ranking (with Lucene's always-positive idf, see ``_bm25``).  Per request the server retrieves the top-k
chunks for the user's question and injects them with ``CONTEXT_TEMPLATE``:

    Answer using the context below. Cite sources as [n].

    [1] (guide.md)
    <chunk text>

    [2] (faq.txt)
    <chunk text>

For chat the block becomes (or is prepended to) the system message; for a
plain completion it is prepended to the prompt.  The response reports the
chunks used in a ``sources`` field (an extension to the OpenAI schema that
standard clients ignore).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

DOC_SUFFIXES = (".txt", ".md")
CONTEXT_HEADER = "Answer using the context below. Cite sources as [n]."
CONTEXT_ENTRY = "[{n}] ({source})\n{text}"
CONTEXT_TEMPLATE = CONTEXT_HEADER + "\n\n{entries}"  # entries joined by a blank line

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize_words(text: str) -> list[str]:
    """Lower-cased word tokens: what BM25 counts."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Chunk:
    source: str  # file path relative to the docs folder
    index: int  # chunk number within the file
    text: str  # the chunk's text


@dataclass(frozen=True)
class Hit:
    chunk: Chunk  # the retrieved chunk
    score: float  # BM25 score (higher = more relevant)

    def to_dict(self) -> dict:
        return {"source": self.chunk.source, "chunk": self.chunk.index, "score": round(self.score, 4)}


def split_text(text: str, chunk_chars: int = 800, overlap_chars: int = 100) -> list[str]:
    """Chunks of at most ``chunk_chars`` characters, split at paragraph, then line, then word boundaries."""
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    if not 0 <= overlap_chars < chunk_chars:
        raise ValueError(f"overlap_chars must be in [0, chunk_chars), got {overlap_chars}")
    pieces = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    units: list[str] = []  # pieces no longer than chunk_chars
    for piece in pieces:
        while len(piece) > chunk_chars:
            cut = piece.rfind("\n", 0, chunk_chars)
            if cut <= 0:
                cut = piece.rfind(" ", 0, chunk_chars)
            if cut <= 0:
                cut = chunk_chars
            units.append(piece[:cut].strip())
            start = cut
            if overlap_chars and cut > overlap_chars:
                # Repeat the last words before the cut, starting at a word boundary.
                space = piece.find(" ", cut - overlap_chars, cut)
                start = space + 1 if space > 0 else cut - overlap_chars
            piece = piece[start:].strip()
        if piece:
            units.append(piece)
    chunks: list[str] = []
    current = ""
    for unit in units:
        if current and len(current) + 2 + len(unit) > chunk_chars:
            chunks.append(current)
            current = unit
        else:
            current = f"{current}\n\n{unit}" if current else unit
    if current:
        chunks.append(current)
    return chunks


def _bm25(corpus: list[list[str]]):
    """rank_bm25's Okapi BM25 with Lucene's idf, log(1 + (N - df + 0.5) / (df + 0.5)).

    Okapi's own idf, log((N - df + 0.5) / (df + 0.5)), is zero or negative for
    a word in half the documents or more: in a small docs folder (two files, a
    handful of chunks) the very word that names the topic scores nothing.
    Lucene's form is always positive and ranks the same on large corpora.
    """
    from rank_bm25 import BM25Okapi

    class LuceneIdfBM25(BM25Okapi):
        def _calc_idf(self, nd: dict[str, int]) -> None:
            n = self.corpus_size
            self.idf = {word: math.log(1.0 + (n - df + 0.5) / (df + 0.5)) for word, df in nd.items()}
            self.average_idf = sum(self.idf.values()) / max(len(self.idf), 1)

    return LuceneIdfBM25(corpus)


class DocIndex:
    """BM25 over chunks of local text files."""

    def __init__(self, chunks: list[Chunk], root: str | None = None):
        if not chunks:
            raise ValueError(f"no text found to index{f' in {root}' if root else ''} "
                             f"(looked for {', '.join(DOC_SUFFIXES)} files)")
        self.chunks = chunks
        self.root = root
        self._bm25 = _bm25([tokenize_words(c.text) or [""] for c in chunks])

    @classmethod
    def from_dir(cls, docs_dir: str | Path, chunk_chars: int = 800, overlap_chars: int | None = None) -> DocIndex:
        """Index every .txt/.md file under ``docs_dir``; overlap defaults to chunk_chars / 8 (at most 100)."""
        if overlap_chars is None:
            overlap_chars = min(100, chunk_chars // 8)
        root = Path(docs_dir)
        if not root.exists():
            raise FileNotFoundError(f"--docs folder not found: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"--docs must be a folder of .txt/.md files, got a file: {root}")
        chunks = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES):
            text = path.read_text(encoding="utf-8", errors="replace")
            for i, piece in enumerate(split_text(text, chunk_chars, overlap_chars)):
                chunks.append(Chunk(source=path.relative_to(root).as_posix(), index=i, text=piece))
        return cls(chunks, root=str(root))

    @property
    def sources(self) -> list[str]:
        return sorted({c.source for c in self.chunks})

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """Top-k chunks for the query; chunks sharing no word with it are never returned."""
        if k <= 0:
            return []
        words = tokenize_words(query)
        if not words:
            return []
        scores = self._bm25.get_scores(words)
        query_set = set(words)
        ranked = sorted(range(len(self.chunks)), key=lambda i: (-scores[i], i))
        hits = []
        for i in ranked:
            # A chunk sharing no word with the query scores 0: never inject it.
            if not query_set.intersection(tokenize_words(self.chunks[i].text)):
                continue
            hits.append(Hit(self.chunks[i], float(scores[i])))
            if len(hits) == k:
                break
        return hits


def format_context(hits: list[Hit]) -> str:
    """The injected block (see ``CONTEXT_TEMPLATE``); entries are numbered from 1 in rank order."""
    entries = "\n\n".join(CONTEXT_ENTRY.format(n=n, source=h.chunk.source, text=h.chunk.text)
                          for n, h in enumerate(hits, 1))
    return CONTEXT_TEMPLATE.format(entries=entries)


def augment_messages(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """Chat messages with the context in the system message (prepended to an existing one)."""
    if not hits:
        return messages
    context = format_context(hits)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{context}\n\n{first.get('content') or ''}".rstrip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


def augment_prompt(prompt: str, hits: list[Hit]) -> str:
    """A completion prompt with the context block in front."""
    if not hits:
        return prompt
    return f"{format_context(hits)}\n\n{prompt}"
