"""Structured outputs enforced while decoding (serve/grammar.py + xgrammar): a random tiny model sampling at
temperature 1.0 still produces only valid answers, because every step masks the tokens that would break them."""
from __future__ import annotations

import json
import re

import httpx
import pytest
import torch
from serve_harness import metric_value, running_server
from serve_harness import tiny_tokenizer as harness_tokenizer

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from tritium.serve.grammar import StructuredOutput, backend_for, encoded_vocab, mask_logits  # noqa: E402
from tritium.serve.sampling import SamplingParams  # noqa: E402

# Nested objects, arrays with bounds, enums, integer ranges, bounded strings, required and optional fields.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 3},
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 1, "maxItems": 2},
        "home": {"type": "object", "properties": {"floor": {"type": "integer", "minimum": -2, "maximum": 9},
                                                   "ok": {"type": "boolean"}},
                 "required": ["floor", "ok"]},
    },
    "required": ["name", "role", "age", "tags", "home"],
}
POINTS = {
    "type": "object",
    "properties": {"points": {"type": "array", "minItems": 2, "maxItems": 2,
                              "items": {"type": "object",
                                        "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                       "label": {"enum": ["a", "b"]}},
                                        "required": ["x", "label"]}},
                   "closed": {"type": "boolean"}},
    "required": ["points", "closed"],
}
N = 6  # requests per schema


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """conftest's serve_model with a longer context: a random model's answers take ~70-90 tokens (it often
    spells characters as byte pieces), so max_tokens=150 leaves a wide margin."""
    from tritium.model.config import ModelConfig
    from tritium.model.transformer import Transformer

    torch.manual_seed(1234)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden=128,
                      vocab_size=tiny_tokenizer.vocab_size, max_seq_len=160, initializer_range=0.2,
                      tie_embeddings=True, backend="torch", name="structured-test")
    return Transformer(cfg, backend="torch").eval()


def run_engine(engine, requests):
    for request_id, prompt, params in requests:
        engine.add_request(request_id, engine.tokenizer.encode(prompt, bos=True), params)
    return engine.run_to_completion()


def test_vocabulary_description(tiny_tokenizer):
    """Control tokens and chat markers are special (""), byte pieces and ▁ pass through for BYTE_FALLBACK."""
    vocab = encoded_vocab(tiny_tokenizer)
    assert len(vocab) == tiny_tokenizer.vocab_size
    for token_id in (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, *tiny_tokenizer.special_ids.values()):
        assert vocab[token_id] == ""
    assert vocab[tiny_tokenizer.piece_to_id("<0x7B>")] == "<0x7B>"
    assert any(piece.startswith("\u2581") for piece in vocab)
    backend = backend_for(tiny_tokenizer)
    assert backend is backend_for(tiny_tokenizer)
    assert backend.stop_token_ids == sorted({tiny_tokenizer.eos_id, tiny_tokenizer.end_of_turn_id})


def test_mask_only_touches_grammar_rows_and_padded_columns(tiny_tokenizer):
    V = tiny_tokenizer.vocab_size
    logits = torch.randn(3, V + 64)  # a padded head: 64 columns with no text
    state = backend_for(tiny_tokenizer).matcher(StructuredOutput.choice(["yes", "no"]))
    masked = mask_logits([None, state, None], logits)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and max(allowed) < V
    texts = {tiny_tokenizer.decode([t]) for t in allowed}
    assert all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    plain = logits[:2]
    assert mask_logits([None, None], plain) is plain


@pytest.mark.parametrize("schema", [PERSON, POINTS], ids=["person", "points"])
def test_json_schema_at_temperature_1_always_valid(model, tiny_tokenizer, schema):
    from tritium.serve.engine import LLMEngine

    # 50 blocks of 8 cannot hold 7 sequences of ~80 tokens: requests get preempted and recomputed mid-answer,
    # and their grammar state must survive that.
    engine = LLMEngine(model, tiny_tokenizer, block_size=8, num_blocks=50, max_num_seqs=N + 1)
    structured = StructuredOutput.json_schema(schema)
    requests = [(f"j{i}", "x", SamplingParams(max_tokens=150, temperature=1.0, seed=i,
                                                         structured=structured)) for i in range(N)]
    requests.append(("plain", "x", SamplingParams(max_tokens=8, temperature=1.0, seed=0)))
    final = run_engine(engine, requests)
    for i in range(N):
        out = final[f"j{i}"]
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        jsonschema.validate(json.loads(out.text), schema)  # strict json: control characters would fail
        assert out.completion_tokens == len(out.token_ids)
    # The unconstrained row in the same batch samples exactly what it samples alone.
    alone = run_engine(LLMEngine(model, tiny_tokenizer, block_size=8, num_blocks=64, max_num_seqs=2),
                       [requests[-1]])
    assert final["plain"].token_ids == alone["plain"].token_ids
    assert engine.blocks.num_used_blocks == 0 and engine.stats()["num_preemptions"] > 0


def test_regex_choice_json_object_and_ignore_eos(model, tiny_tokenizer):
    from tritium.serve.engine import LLMEngine

    engine = LLMEngine(model, tiny_tokenizer, block_size=8, num_blocks=128, max_num_seqs=8)
    pattern = r"[a-z]{2,5}@[0-9]{1,3}\.(com|org)"
    choices = ["red", "green", "blue sky", "é\"q"]
    requests = []
    for i in range(3):
        requests.append((f"re{i}", "x", SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                                                       structured=StructuredOutput.regex(pattern))))
        requests.append((f"ch{i}", "x", SamplingParams(max_tokens=40, temperature=1.0, seed=i, ignore_eos=True,
                                                       structured=StructuredOutput.choice(choices))))
    requests.append(("obj", "x", SamplingParams(max_tokens=60, temperature=0.0,
                                                structured=StructuredOutput.json_object())))
    final = run_engine(engine, requests)
    for i in range(3):
        assert final[f"re{i}"].finish_reason == "stop" and re.fullmatch(pattern, final[f"re{i}"].text)
        # ignore_eos: the grammar still ends the answer once complete
        assert final[f"ch{i}"].finish_reason == "stop" and final[f"ch{i}"].text in choices
    obj = final["obj"]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # ran out of tokens: still a valid prefix of an object
        assert obj.finish_reason == "length" and obj.text.startswith("{")


def test_no_grammar_no_grammar_work(model, tiny_tokenizer, monkeypatch):
    """Requests without a grammar never reach the grammar code (the fast path has no per-step cost)."""
    from tritium.serve import grammar
    from tritium.serve.engine import LLMEngine

    def boom(*args, **kwargs):
        raise AssertionError("grammar code ran for a request without a grammar")

    monkeypatch.setattr(grammar, "mask_logits", boom)
    monkeypatch.setattr(grammar, "backend_for", boom)
    engine = LLMEngine(model, tiny_tokenizer, block_size=8, num_blocks=64, max_num_seqs=4)
    final = run_engine(engine, [(f"p{i}", "x", SamplingParams(max_tokens=5, seed=i)) for i in range(3)])
    assert all(out.finish_reason in ("stop", "length") for out in final.values())


def test_invalid_specs_are_value_errors():
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        StructuredOutput.json_schema({"type": "nonsense"})
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutput.choice([])
    with pytest.raises(ValueError, match="SamplingParams.structured"):
        SamplingParams(structured={"type": "json_object"})


# ---------------------------------------------------------------------------------------------- through the API
@pytest.fixture(scope="module")
def server():
    from tritium.serve.api import ServeConfig

    with running_server(ServeConfig(max_tokens_cap=120)) as srv:
        yield srv


def test_openai_client_response_format(server):
    import openai

    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    before = metric_value(httpx.get(f"{server.url}/metrics").text, "tritium_completion_tokens_total")
    fmt = {"type": "json_schema", "json_schema": {"name": "points", "schema": POINTS, "strict": True}}
    chat = oai.chat.completions.create(model="tritium", messages=[{"role": "user", "content": "Two points?"}],
                                       response_format=fmt, max_tokens=120, temperature=1.0, seed=1, n=2)
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), POINTS)
    stream = oai.completions.create(model="tritium", prompt="Answer:", max_tokens=120, temperature=1.0, seed=2,
                                    extra_body={"response_format": fmt}, stream=True,
                                    stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    jsonschema.validate(json.loads("".join(parts)), POINTS)
    assert reasons[-1] == "stop"
    choice = oai.chat.completions.create(model="tritium", messages=[{"role": "user", "content": "Pick"}],
                                         max_tokens=20, temperature=1.0, seed=3,
                                         extra_body={"guided_choice": ["alpha", "beta"]})
    assert choice.choices[0].message.content in ("alpha", "beta") and choice.choices[0].finish_reason == "stop"
    # usage and /metrics stay exact
    after = metric_value(httpx.get(f"{server.url}/metrics").text, "tritium_completion_tokens_total")
    assert after - before == chat.usage.completion_tokens + usage.completion_tokens + choice.usage.completion_tokens


@pytest.mark.parametrize("body,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}}, "response_format", "cannot compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", "name"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"guided_regex": "(["}, "guided_regex", "cannot compile"),
    ({"guided_choice": "yes"}, "guided_choice", "non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
])
def test_invalid_structured_output_is_400_naming_the_field(server, body, param, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_openai_client_invalid_schema_is_bad_request(server):
    import openai

    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tritium", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "bad", "schema": {"type": "object", "required": "name"}}})
    assert info.value.body["param"] == "response_format"


def test_policy_json_schema_is_enforced_not_retried(tmp_path):
    from tritium.serve.api import ServeConfig

    path = tmp_path / "json.yaml"
    path.write_text("output:\n  json_schema: {type: object, properties: {answer: {enum: ['yes', 'no']}}, "
                    "required: [answer]}\n  json_retries: 0\n")
    with running_server(ServeConfig(policy_file=str(path))) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        for seed in range(3):
            r = client.post("/v1/completions", json={"prompt": "Q:", "max_tokens": 30, "temperature": 1.0,
                                                     "seed": seed})
            assert r.status_code == 200, r.text
            assert json.loads(r.json()["choices"][0]["text"])["answer"] in ("yes", "no")
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "tritium_policy_violations_total", {"check": "output_json_schema"}) == 0


def test_tokenizer_of_harness_is_supported():
    """The server tests' smaller tokenizer (vocab 400) builds a backend too."""
    assert backend_for(harness_tokenizer()).vocab_size == harness_tokenizer().vocab_size
