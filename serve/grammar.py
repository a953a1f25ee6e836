"""Structured outputs enforced while decoding: the glue between tritium and xgrammar.

A request may carry a ``StructuredOutput`` (a JSON schema, any JSON object, a regular expression or a
fixed list of choices).  Its grammar is compiled once per distinct spec (``GrammarBackend.compile``, an
LRU cache on top of xgrammar's own) and each sequence gets a ``GrammarMatcher``.  Every step,
``mask_logits`` fills one token bitmask for all rows that carry a grammar and sets the logits of tokens
that would break the output to -inf; rows without a grammar are not touched (no per-step cost for
them).  After a token is sampled, ``GrammarState.accept`` advances the matcher.  Once the grammar is
complete the mask allows only stop tokens (eos / ``<|end|>``), so the request ends with finish_reason
"stop".

xgrammar (https://github.com/mlc-ai/xgrammar, the engine vLLM and SGLang use) does the grammar work; this
module only describes tritium's sentencepiece vocabulary to it: byte-fallback pieces ``<0xNN>`` stand for
one byte, ``▁`` stands for a space, and control tokens / chat markers are special (never allowed inside
structured output).  Logit columns past the tokenizer's size (a padded head) stay masked.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("json_object", "json_schema", "regex", "choice")
# Bounds that keep a hostile request from costing the server much: compiling is O(spec size).
MAX_SPEC_CHARS = 64_000
MAX_CHOICES = 1024
CACHE_SIZE = 256  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class StructuredOutput:
    """What shape a completion must have.

    ``kind``: "json_object" (any JSON object; ``spec`` is ""), "json_schema" (``spec`` is the schema as
    canonical JSON text), "regex" (``spec`` is the pattern, matched in full) or "choice" (``choices``
    holds the allowed answers; ``spec`` is their JSON list).  Build with the ``json_object``,
    ``json_schema``, ``regex`` and ``choice`` class methods, which validate the spec (ValueError).
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> StructuredOutput:
        """``schema``: a JSON schema (dict); ValueError if it is not a valid schema."""
        import jsonschema

        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.exceptions.SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise ValueError(f"not a valid JSON schema at {where}: {exc.message}") from None
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"the JSON schema is {len(text)} characters; at most {MAX_SPEC_CHARS}")
        return cls("json_schema", text)

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a regex must be a non-empty string")
        if len(pattern) > MAX_SPEC_CHARS:
            raise ValueError(f"the regex is {len(pattern)} characters; at most {MAX_SPEC_CHARS}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> StructuredOutput:
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices \
                or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"{len(choices)} choices; at most {MAX_CHOICES}")
        return cls("choice", json.dumps(list(choices)), tuple(choices))

    def ebnf(self) -> str:
        """A choice list as an xgrammar EBNF grammar (JSON string escapes are valid EBNF literal escapes)."""
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(self.choices))


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - an optional dependency of the serve extra
        raise ImportError("structured outputs need the 'xgrammar' package: pip install 'tritium[serve]' "
                          "(or pip install xgrammar)") from exc
    return xgrammar


# xgrammar 0.2.x writes a length-bounded JSON string's character as [^"\\\r\n], which admits raw control
# characters (U+0000-U+001F) that JSON forbids inside strings; its unbounded strings already exclude them.
_LOOSE_JSON_CHAR = r'[^\"\\\r\n]'
_JSON_CHAR = r'[^\0-\x1f\"\\\r\n]'


def json_grammar(structured: StructuredOutput) -> Any:
    """The xgrammar ``Grammar`` of a JSON kind: compact separators (``", "`` and ``": "``, no free
    whitespace, so a model cannot pad its answer with endless blanks), strict mode (no properties or
    items the schema does not list), and every string character a legal unescaped JSON one."""
    xgr = _xgrammar()
    schema = structured.spec if structured.kind == "json_schema" else '{"type": "object"}'
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    text = str(grammar)
    if _LOOSE_JSON_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_JSON_CHAR, _JSON_CHAR))


def encoded_vocab(tokenizer) -> list[str]:
    """The tokenizer's pieces for xgrammar's BYTE_FALLBACK vocabulary type (``<0xNN>`` = one byte, ``▁`` =
    space); control tokens and chat markers become "" so xgrammar treats them as special (never
    allowed by a grammar)."""
    special = {getattr(tokenizer, name, None) for name in ("unk_id", "bos_id", "eos_id", "pad_id")}
    special |= set(getattr(tokenizer, "special_ids", {}).values())
    return ["" if i in special else tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def stop_ids_of(tokenizer) -> list[int]:
    ids = [getattr(tokenizer, name, None) for name in ("eos_id", "end_of_turn_id")]
    return sorted({i for i in ids if isinstance(i, int) and i >= 0})


class GrammarBackend:
    """One tokenizer's xgrammar compiler and a cache of compiled grammars (thread-safe: the API thread
    compiles to validate a request, the engine thread compiles again and hits the cache)."""

    def __init__(self, tokenizer, max_threads: int = 1) -> None:
        xgr = _xgrammar()
        self.vocab_size = tokenizer.vocab_size
        self.stop_token_ids = stop_ids_of(tokenizer)
        self.info = xgr.TokenizerInfo(encoded_vocab(tokenizer), xgr.VocabType.BYTE_FALLBACK,
                                      vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids,
                                      add_prefix_space=False)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, structured: StructuredOutput) -> Any:
        """The xgrammar ``CompiledGrammar`` for ``structured`` (cached); ValueError if xgrammar rejects it
        (e.g. a schema feature it does not support, or an invalid regex)."""
        with self._lock:
            if structured in self._cache:
                self._cache.move_to_end(structured)
                return self._cache[structured]
        try:
            if structured.kind in ("json_object", "json_schema"):
                compiled = self.compiler.compile_grammar(json_grammar(structured))
            elif structured.kind == "regex":
                compiled = self.compiler.compile_regex(structured.spec)
            elif structured.kind == "choice":
                compiled = self.compiler.compile_grammar(structured.ebnf())
            else:
                raise ValueError(f"unknown structured output kind {structured.kind!r}; one of {KINDS}")
        except (RuntimeError, TypeError) as exc:  # xgrammar reports bad specs as RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)  # xgrammar's "[time] file.cc:line: " prefix
            raise ValueError(f"cannot compile the {structured.kind.replace('_', ' ')}: {first}") from None
        with self._lock:
            self._cache[structured] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, structured: StructuredOutput, stop_token_ids: Sequence[int] = ()) -> GrammarState:
        stops = sorted(set(self.stop_token_ids) | {int(t) for t in stop_token_ids if 0 <= t < self.vocab_size})
        return GrammarState(_xgrammar().GrammarMatcher(self.compile(structured), override_stop_tokens=stops),
                            self.vocab_size)


_BACKENDS: dict[int, tuple[Any, GrammarBackend]] = {}
_BACKENDS_LOCK = threading.Lock()


def backend_for(tokenizer) -> GrammarBackend:
    """The shared ``GrammarBackend`` of ``tokenizer`` (built once: the vocabulary scan costs ~V pieces)."""
    with _BACKENDS_LOCK:
        entry = _BACKENDS.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, GrammarBackend(tokenizer))
            _BACKENDS[id(tokenizer)] = entry
        return entry[1]


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's: the bitmask's width in bits
        self.stop_token_ids = frozenset(matcher.stop_token_ids)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; ValueError if the grammar does not allow it (a masking bug)."""
        if not self.matcher.accept_token(int(token_id)):
            raise ValueError(f"token {token_id} breaks the request's structured output grammar")

    @property
    def complete(self) -> bool:
        """The answer is whole and only a stop token could follow (e.g. a closed JSON object), so the
        sequence can end now without spending a step (and a max_tokens slot) on eos.  Costs one mask
        fill, only once the grammar's root rule is matched."""
        if not self.matcher.is_completed():
            return False
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten()[:self.vocab_size].nonzero().flatten().tolist()
        return set(allowed) <= self.stop_token_ids

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self.matcher.is_terminated()


def mask_logits(grammars: Sequence[GrammarState | None], logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, V) with, in each row that has a grammar, every token the grammar forbids at -inf.

    One bitmask (B, ceil(V/32)) int32 is filled for the rows with a grammar and applied in place to a
    copy; rows whose entry is None are unchanged.  Columns past the tokenizer's size are forbidden too.
    """
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return logits
    xgr = _xgrammar()
    vocab = grammars[rows[0]].vocab_size
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
    for row in rows:
        grammars[row].matcher.fill_next_token_bitmask(bitmask, row)
    masked = logits.float().clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), vocab_size=min(vocab, logits.shape[-1]),
                                    indices=rows)
    if logits.shape[-1] > vocab:  # padded head rows have no text
        masked[rows, vocab:] = float("-inf")
    return masked
