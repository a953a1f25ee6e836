"""Structured outputs: the per-token cost of decoding under a grammar.

One call is one sampling step for a batch of B rows (``sample_for``, what the engine runs after each
forward pass): "unconstrained" rows take the fast path (no grammar code runs), "json_schema" rows each
carry an xgrammar matcher for a nested JSON schema, so the step also fills the batch's token bitmask,
applies it to the logits and advances every matcher past its sampled token (a matcher whose answer is
complete starts over, so every call does the same work).  tokens/s counts one token per row; the time
difference per token between the two providers is the overhead of constrained decoding.  The model's
forward pass is left out: it is the same for both, so this is the overhead's upper bound as a fraction.
"""
from __future__ import annotations

import tempfile

import torch

from tritium.bench.registry import Case, Skip, register

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "integer"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "role", "scores", "address"],
}
_TOKENIZER: list = []


def _tokenizer():
    if not _TOKENIZER:
        from tritium.model.tokenizer import train_tokenizer

        with tempfile.TemporaryDirectory() as directory:
            _TOKENIZER.append(train_tokenizer(None, 2048, directory, max_bytes=300_000))
    return _TOKENIZER[0]


def _factory(constrained: bool):
    def factory(size, mode, device, dtype):
        from tritium.serve.sampling import SamplingParams
        from tritium.serve.sequence import SequenceState, sample_for

        structured = None
        if constrained:
            try:
                from tritium.serve.grammar import StructuredOutput
            except ImportError as exc:  # pragma: no cover
                raise Skip(f"xgrammar missing: {exc}") from None
            structured = StructuredOutput.json_schema(SCHEMA)
        tokenizer = _tokenizer()
        B = size["B"]
        params = SamplingParams(max_tokens=10**6, temperature=1.0, seed=0, structured=structured)
        states = [SequenceState([tokenizer.bos_id], params, tokenizer, device) for _ in range(B)]
        generator = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(B, tokenizer.vocab_size, generator=generator, device=device)

        def step():
            tokens, _ = sample_for(states, logits)
            if constrained:
                for state, token in zip(states, tokens):
                    grammar = state.grammar
                    grammar.accept(token)
                    if grammar.terminated or grammar.complete:
                        grammar.matcher.reset()
            return tokens
        return step
    return factory


register(Case(
    name="structured_sampling", area="generation",
    sizes=[{"B": b} for b in (1, 8, 64)],
    quick_sizes=[{"B": 8}],
    cpu_sizes=[{"B": 1}, {"B": 8}],
    providers={"unconstrained": _factory(False), "json_schema": _factory(True)},
    metric="tokens/s", modes=("fwd",), work=lambda size, mode: size["B"], baseline="unconstrained",
    note="one sampling step (B rows, vocab 2048); json_schema adds xgrammar's bitmask fill + apply + advance",
))
