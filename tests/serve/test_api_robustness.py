"""Issue 16: one request can never hurt another, and the server never reports healthy while broken.

Every numbered case of the issue is a test here with the value it must give, next to a kind-level test:
fault injection at each per-request stage with an innocent request running beside the faulty one,
engine-wide faults, a property test that no request body reaches a 500, logprob bytes, and shutdown.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_harness import make_engine, running_server, tiny_model, tiny_tokenizer

POISON_SEED = 4242  # the request a fault is injected into
INNOCENT = {"prompt": "an innocent request", "max_tokens": 12, "ignore_eos": True, "seed": 1}


@pytest.fixture(scope="module")
def server():
    from tritium.serve.api import ServeConfig

    with running_server(ServeConfig(max_tokens_cap=64, max_body_bytes=8192)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def sse_payloads(raw: str) -> list[str]:
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    return [b[len("data: "):] for b in raw.split("\n\n")[:-1]][:-1]


def assert_openai_error(body: dict, status_type: str, code: str | None = None, param: str | None = None) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == status_type
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_healthy(client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    r = client.post("/v1/completions", json=INNOCENT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12


def run_concurrently(server, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.post(url, json=body) for url, body in bodies))

    return asyncio.run(main())


# ----------------------------------------------------------------------------- A: case 1 and field ranges
def test_case1_top_k_past_int64_is_400_before_any_work(client):
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "top_k": 2**63, "stream": stream})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")  # no stream opened
        assert_openai_error(r.json(), "invalid_request_error", "invalid_value", "top_k")
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "top_k": 2**63 - 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert_healthy(client)


@pytest.mark.parametrize("field,value", [
    ("top_k", -2), ("top_k", 2**63), ("seed", 2**64), ("seed", -(2**63) - 1), ("temperature", 2.5),
    ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.1), ("min_p", 1.5), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("max_tokens", 0), ("max_tokens", 2**70), ("n", 0),
    ("n", 2**64), ("stop_token_ids", [2**64]), ("logprobs", 2), ("temperature", "hot"), ("seed", 1.5),
])
def test_every_field_checked_with_its_range(client, field, value):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, field: value, "stream": True})
    assert r.status_code == 400, r.text
    assert_openai_error(r.json(), "invalid_request_error", param=field)


# ----------------------------------------------------------------------------- A: case 2, padded vocabulary
class PaddedVocabModel(torch.nn.Module):
    """The tiny model with ``extra`` head rows past the tokenizer (a padded vocabulary), whose logits are
    made the largest: without masking every sampled id would be one the tokenizer cannot decode."""

    def __init__(self, inner: torch.nn.Module, extra: int):
        import dataclasses

        super().__init__()
        self.inner = inner
        self.extra = extra
        self.config = dataclasses.replace(inner.config, vocab_size=inner.config.vocab_size + extra)

    def forward(self, input_ids, position_ids=None, kv_cache=None):
        logits = self.inner(input_ids, position_ids=position_ids, kv_cache=kv_cache)
        return torch.cat([logits, torch.full((*logits.shape[:-1], self.extra), 1e4, dtype=logits.dtype)], -1)


def test_case2_padded_vocabulary_never_samples_past_the_tokenizer():
    from tritium.serve.api import ServeConfig
    from tritium.serve.engine import LLMEngine
    from tritium.serve.sampling import SamplingParams

    tok = tiny_tokenizer()
    model = PaddedVocabModel(tiny_model(), extra=64).eval()
    assert model.config.vocab_size == tok.vocab_size + 64
    engine = LLMEngine(model, tok, block_size=16, num_blocks=64, max_num_seqs=4)
    for i, params in enumerate([SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True),
                                SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)]):
        engine.add_request(f"r{i}", tok.encode("hello", bos=True), params)
    outs = engine.run_to_completion()
    for out in outs.values():
        assert out.finish_reason == "length" and out.error is None
        assert out.token_ids and max(out.token_ids) < tok.vocab_size
    assert all(lp > -1e3 for lp in outs["r0"].logprobs)  # logprobs over the tokenizer's own ids
    with running_server(ServeConfig(), engine=LLMEngine(model, tok, block_size=16, num_blocks=64)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "ignore_eos": True, "seed": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


# ----------------------------------------------------------------------------- A: the kind, fault injection
def _poisoned_task() -> bool:
    """True inside the asyncio task serving the poisoned request (test-only: reads the task's params)."""
    task = asyncio.current_task()
    frame = task.get_coro().cr_frame if task is not None else None
    params = frame.f_locals.get("params") if frame is not None else None
    return getattr(params, "seed", None) == POISON_SEED


def inject(stage: str, monkeypatch, server) -> None:
    import tritium.serve.api as api
    import tritium.serve.detokenizer as detok
    import tritium.serve.sequence as sequence

    def boom(where):
        # a ValueError in the server's own stages must not pass for "the engine refused the request" (400)
        raise (ValueError if stage in ("policy", "logprobs") else RuntimeError)(f"injected fault in {where}")

    if stage == "sampling":
        real = sequence.sample_next

        def sample_next(logits, params, *args, **kwargs):
            if any(p.seed == POISON_SEED for p in params):
                boom("sampling")
            return real(logits, params, *args, **kwargs)

        monkeypatch.setattr(sequence, "sample_next", sample_next)
    elif stage in ("detokenize", "stop"):
        real_init, real_add, real_release = detok.TextTracker.__init__, detok.IncrementalDetokenizer.add, \
            detok.TextTracker._release

        def init(self, tokenizer, stop=()):
            real_init(self, tokenizer, stop)
            self.detok.poisoned = self.poisoned = "POISON" in stop

        def add(self, token_id):
            if getattr(self, "poisoned", False) and stage == "detokenize":
                boom("detokenize")
            return real_add(self, token_id)

        def release(self, new, final):
            if getattr(self, "poisoned", False) and stage == "stop":
                boom("the stop-string check")
            return real_release(self, new, final)

        monkeypatch.setattr(detok.TextTracker, "__init__", init)
        monkeypatch.setattr(detok.IncrementalDetokenizer, "add", add)
        monkeypatch.setattr(detok.TextTracker, "_release", release)
    elif stage == "policy":
        from tritium.serve.policy import OutputFilter, Policy

        class FaultyFilter(OutputFilter):
            def feed(self, delta):
                if _poisoned_task():
                    boom("the output policy")
                return super().feed(delta)

        policy = Policy.from_dict({})
        monkeypatch.setattr(policy, "output_filter", lambda: FaultyFilter(policy.output))
        monkeypatch.setattr(server.app.state.server, "policy", policy)
    elif stage == "logprobs":
        real = api.token_bytes

        def token_bytes(tokenizer, token_id):
            if _poisoned_task():
                boom("logprobs")
            return real(tokenizer, token_id)

        monkeypatch.setattr(api, "token_bytes", token_bytes)
    else:
        raise AssertionError(stage)


@pytest.mark.parametrize("stage", ["sampling", "detokenize", "stop", "policy", "logprobs"])
def test_fault_in_one_request_fails_it_alone(server, client, monkeypatch, stage):
    inject(stage, monkeypatch, server)
    poison = {"prompt": "poisoned", "max_tokens": 12, "ignore_eos": True, "seed": POISON_SEED, "logprobs": 1,
              "stop": ["POISON"]}
    innocent_stream = {**INNOCENT, "stream": True, "logprobs": 1, "stop": ["never appears"]}
    results = run_concurrently(server, [("/v1/completions", poison), ("/v1/completions", {**poison, "stream": True}),
                                        ("/v1/completions", INNOCENT), ("/v1/completions", innocent_stream)])
    failed, failed_stream, innocent, innocent_streamed = results
    assert failed.status_code == 500
    error = assert_openai_error(failed.json(), "server_error", "generation_failed")
    assert "injected fault in" in error["message"] and "generation failed for this request" in error["message"]
    events = [json.loads(e) for e in sse_payloads(failed_stream.text)]  # the stream still ends with [DONE]
    assert_openai_error(events[-1], "server_error", "generation_failed")
    assert innocent.status_code == 200 and innocent.json()["usage"]["completion_tokens"] == 12
    chunks = [json.loads(e) for e in sse_payloads(innocent_streamed.text)]
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    monkeypatch.undo()
    assert_healthy(client)
    assert server.app.state.server.engine.stats()["running"]


def test_engine_isolates_a_sampling_fault_to_its_row(monkeypatch):
    """In one batch, the faulty request fails alone and every other request's tokens are exactly what a
    clean run gives (the batched sampler falls back to per-row calls to find the culprit)."""
    import tritium.serve.sequence as sequence
    from tritium.serve.sampling import SamplingParams

    tok = tiny_tokenizer()

    def run(poisoned: bool):
        engine = make_engine()
        for i in range(4):
            seed = POISON_SEED if poisoned and i == 2 else i
            engine.add_request(f"r{i}", tok.encode(f"prompt {i}", bos=True),
                               SamplingParams(max_tokens=6, seed=seed, ignore_eos=True))
        return engine, engine.run_to_completion()

    _, clean = run(False)
    real = sequence.sample_next

    def sample_next(logits, params, *args, **kwargs):
        if any(p.seed == POISON_SEED for p in params):
            raise FloatingPointError("injected")
        return real(logits, params, *args, **kwargs)

    monkeypatch.setattr(sequence, "sample_next", sample_next)
    engine, outs = run(True)
    assert outs["r2"].finish_reason == "error" and outs["r2"].error == "FloatingPointError: injected"
    for i in (0, 1, 3):
        assert outs[f"r{i}"].token_ids == clean[f"r{i}"].token_ids and outs[f"r{i}"].error is None
    stats = engine.stats()
    assert stats["num_request_errors"] == 1 and stats["kv_blocks_used"] == 0 and not engine.has_unfinished()


def test_engine_wide_fault_fails_the_step_then_recovers(server, client, monkeypatch):
    llm = server.app.state.server.llm
    real_forward, calls = llm._forward, []

    def forward(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_forward(rows)

    monkeypatch.setattr(llm, "_forward", forward)
    r = client.post("/v1/completions", json=INNOCENT)
    assert r.status_code == 500 and "illegal memory access" in r.json()["error"]["message"]
    assert_healthy(client)  # one bad step: the engine recovered
    assert llm.stats()["num_step_errors"] >= 1 and llm.consecutive_step_errors == 0


def test_persistent_engine_fault_makes_health_fail_and_the_server_exit():
    from tritium.serve.api import ServeConfig

    engine = make_engine()

    def broken(rows):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine._forward = broken
    exited = threading.Event()
    with running_server(ServeConfig(), engine=engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        srv.app.state.server.exit_hook = exited.set
        statuses = [c.post("/v1/completions", json=INNOCENT).status_code for _ in range(3)]
        assert statuses == [500, 500, 500]  # each failed step fails its request, with a clear error
        assert exited.wait(10), "a broken engine must ask the process to exit"
        health, ready = c.get("/health"), c.get("/ready")
        assert health.status_code == 503 and "out of memory" in health.json()["error"]
        assert ready.status_code == 503
        r = c.post("/v1/completions", json=INNOCENT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


def test_make_server_exits_nonzero_path_is_wired():
    from tritium.serve.api import ServeConfig, create_app
    from tritium.serve.cli_serve import make_server

    app = create_app(make_engine(), tiny_tokenizer(), ServeConfig())
    uv = make_server(app, "127.0.0.1", 0, 1.0, "warning")
    app.state.server._engine_failed(RuntimeError("boom"))
    assert uv.should_exit and app.state.server.fatal_error == "RuntimeError: boom"


# ----------------------------------------------------------------------------- B: no input reaches a 500
def test_case3_deep_nesting_is_400():
    from tritium.serve.protocol import ServeError, parse_json

    for depth in (100_000, 1000, 33):
        raw = b'{"prompt": "hi", "x": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(ServeError) as info:
            parse_json(raw)
        assert info.value.status == 400 and "nested more than 32 levels" in info.value.message
    parse_json(b'{"prompt": "hi", "x": ' + b"[" * 30 + b"]" * 30 + b"}")  # within the limit


def test_case3_deep_nesting_over_http(client):
    raw = b'{"prompt": "hi", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert_openai_error(r.json(), "invalid_request_error", "invalid_json")


def test_other_parse_limits_are_400(client):
    cases = [(b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "invalid_json"),  # past int digit limit
             (b'{"prompt": "hi", "max_tokens": 1e999}', "invalid_type"),  # parses to inf
             (b'{"prompt": "\xff\xfe"}', "invalid_json"),  # not UTF-8
             (b'{"prompt": "hi", "temperature": NaN}', "invalid_type")]
    for raw, code in cases:
        r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (raw[:40], r.text)
        assert_openai_error(r.json(), "invalid_request_error", code)


def test_case4_lone_surrogates_are_400(client):
    cases = [("/v1/completions", {"prompt": "abc \ud800 def", "max_tokens": 4}, "prompt"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udfff"}]}, "messages[0].content"),
             ("/v1/completions", {"prompt": "ok", "stop": ["\udc00"]}, "stop[0]")]
    for url, body, param in cases:
        r = client.post(url, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        error = assert_openai_error(r.json(), "invalid_request_error", "invalid_text", param)
        assert "surrogate" in error["message"]
    assert_healthy(client)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**63, 2**64, 1e308])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(["\ud800", "<|end|>", "", "x" * 300]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)
_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
           "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "echo", "best_of",
           "response_format", "retrieval", "logit_bias", "user"]


@st.composite
def _bodies(draw):
    body = draw(st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6))
    if draw(st.booleans()):
        body["prompt"] = draw(st.one_of(st.text(max_size=20), st.lists(st.integers(0, 500), min_size=1, max_size=5)))
    if draw(st.booleans()):
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "assistant", "robot"])),
                             "content": draw(st.text(max_size=20))}]
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=_bodies(), chat=st.booleans())
def test_property_no_body_reaches_a_500(server, body, chat):
    """Any JSON body either is refused with a 4xx naming what is wrong, or yields requests whose every
    value the sampler and the engine accept (nothing can throw on a value later, in the engine thread)."""
    from tritium.serve.protocol import ServeError, parse_json
    from tritium.serve.sampling import sample_next

    srv = server.app.state.server
    raw = json.dumps(body).encode()
    try:
        job = srv.prepare(parse_json(raw), chat=chat, endpoint="/v1/x", t0=0.0)
    except ServeError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    logits = torch.randn(1, tiny_tokenizer().vocab_size)
    for ids, params in zip(job.prompts, job.params):
        srv.llm.validate_request(ids, params)
        assert sample_next(logits, [params], [params.make_generator("cpu")])[0].item() < logits.shape[-1]


# ----------------------------------------------------------------------------- D: logprob bytes
class ScriptedModel(torch.nn.Module):
    """Next token = ``script[last input token]`` (default ``first``): a reply spelled by chosen pieces."""

    def __init__(self, inner: torch.nn.Module, first: int, script: dict[int, int]):
        super().__init__()
        self.inner, self.config, self.first, self.script = inner, inner.config, first, script

    def forward(self, input_ids, position_ids=None, kv_cache=None):
        logits = self.inner(input_ids, position_ids=position_ids, kv_cache=kv_cache)
        nxt = torch.tensor([[self.script.get(int(t), self.first) for t in row] for row in input_ids])
        return logits.scatter(-1, nxt[..., None], 1e4)


def test_case6_byte_fallback_logprob_bytes():
    from tritium.serve.api import ServeConfig
    from tritium.serve.engine import LLMEngine

    tok = tiny_tokenizer()
    c3, a9 = tok.piece_to_id("<0xC3>"), tok.piece_to_id("<0xA9>")
    assert tok.decode([c3, a9]) == "é" and tok.decode([c3]) == "\ufffd"
    model = ScriptedModel(tiny_model(), c3, {c3: a9, a9: tok.end_of_turn_id})
    engine = LLMEngine(model, tok, block_size=16, num_blocks=64)
    body = {"messages": [{"role": "user", "content": "say é"}], "logprobs": True, "max_tokens": 8}
    with running_server(ServeConfig(), engine=engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        full = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert full["message"]["content"] == "é"
        entries = full["logprobs"]["content"]
        assert [e["bytes"] for e in entries] == [[195], [169]]
        assert [e["token"] for e in entries] == ["bytes:\\xc3", "bytes:\\xa9"]
        streamed = [json.loads(e) for e in sse_payloads(c.post("/v1/chat/completions",
                                                               json={**body, "stream": True}).text)]
        stream_entries = [e for ch in streamed for choice in ch["choices"] if choice["logprobs"]
                          for e in choice["logprobs"]["content"]]
        assert [e["bytes"] for e in stream_entries] == [[195], [169]]
        legacy = c.post("/v1/completions", json={"prompt": "x", "logprobs": 1, "max_tokens": 2}).json()
        lp = legacy["choices"][0]["logprobs"]
        assert legacy["choices"][0]["text"] == "é" and lp["tokens"] == ["bytes:\\xc3", "bytes:\\xa9"]
        assert lp["text_offset"] == [0, 0]  # the second byte still belongs to the character at 0


@pytest.mark.parametrize("chat", [False, True])
def test_logprob_bytes_concatenate_to_the_text(client, chat):
    """The random model's replies are full of byte-fallback pieces (256 of its 400 ids): over many seeded
    replies, streamed and not, the tokens' bytes are exactly the UTF-8 of the text (decoded with U+FFFD
    for bytes that never form a character, as the text itself is)."""
    url = "/v1/chat/completions" if chat else "/v1/completions"
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    for seed in range(6):
        body = {**base, "max_tokens": 16, "ignore_eos": True, "seed": seed, "logprobs": True if chat else 1}
        full = client.post(url, json=body).json()["choices"][0]
        text = full["message"]["content"] if chat else full["text"]
        if chat:
            data = b"".join(bytes(e["bytes"]) for e in full["logprobs"]["content"])
        else:
            stream = [json.loads(e) for e in sse_payloads(client.post(url, json={**body, "stream": True}).text)]
            data = b"".join(bytes(e["bytes"]) for e in _legacy_entries(full["logprobs"]))
            streamed = [lp for ch in stream for c in ch["choices"] if c["logprobs"] for lp in _legacy_entries(
                c["logprobs"])]
            assert b"".join(bytes(e["bytes"]) for e in streamed) == data
        assert data.decode("utf-8", errors="replace") == text
        if "\ufffd" not in text:
            assert data == text.encode("utf-8")


def _legacy_entries(logprobs: dict) -> list[dict]:
    """Completions logprobs carry no bytes; rebuild them from the tokens (the bytes: form included)."""
    out = []
    for token in logprobs["tokens"]:
        if token.startswith("bytes:"):
            data = bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
        else:
            data = token.encode()
        out.append({"bytes": list(data)})
    return out


# ----------------------------------------------------------------------------- E: shutdown
def _gate(srv) -> threading.Event:
    gate, llm = threading.Event(), srv.app.state.server.llm
    step = llm.step

    def gated():
        gate.wait(30)
        return step()

    llm.step = gated
    return gate


def _fire(srv, bodies) -> tuple[list[threading.Thread], dict]:
    results: dict = {}

    def one(i, body):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            results[i] = c.post("/v1/completions", json=body)

    threads = [threading.Thread(target=one, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while srv.app.state.server.in_flight < len(bodies):
        assert time.monotonic() < deadline, "requests were not admitted"
        time.sleep(0.01)
    return threads, results


@pytest.mark.parametrize("finish_in_grace", [True, False])
def test_case7_shutdown_in_flight_ends_with_answer_or_clean_503(finish_in_grace):
    from tritium.serve.api import ServeConfig

    grace = 8.0 if finish_in_grace else 2.0  # room for a loaded CI machine to finish the requests
    with running_server(ServeConfig(shutdown_grace_s=grace), drain_grace_s=grace) as srv:
        gate = _gate(srv)
        bodies = [{"prompt": f"story {i}", "max_tokens": 10, "ignore_eos": True, "stream": i % 2 == 0}
                  for i in range(6)]
        threads, results = _fire(srv, bodies)
        srv.sigterm()
        deadline = time.monotonic() + 5
        while not srv.app.state.server.draining:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with httpx.Client(base_url=srv.url, timeout=10) as c:  # still accepting, answering 503
            late = c.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            assert c.get("/ready").status_code == 503
        if finish_in_grace:
            gate.set()
        for t in threads:
            t.join(30)
        gate.set()
        for i, body in enumerate(bodies):
            r = results[i]
            if body["stream"]:
                assert r.status_code == 200
                events = [json.loads(e) for e in sse_payloads(r.text)]  # always ends with data: [DONE]
                if finish_in_grace:
                    assert events[-1]["usage"]["completion_tokens"] == 10
                else:
                    assert_openai_error(events[-1], "server_error", "shutting_down")
            elif finish_in_grace:
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
            else:
                assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
                assert_openai_error(r.json(), "server_error", "shutting_down")
        srv.thread.join(30)
        assert not srv.thread.is_alive()


# ----------------------------------------------------------------------------- 12: the API key off the command line
def test_case12_api_key_from_env_or_file(tmp_path, monkeypatch):
    import argparse

    from tritium.serve.api import API_KEY_ENV, ServeConfig
    from tritium.serve.cli_serve import add_arguments, read_api_key

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    key_file = tmp_path / "api-key"
    key_file.write_text("  s3cret-from-file \n")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    from_file = parser.parse_args(["--checkpoint", "x", "--api-key-file", str(key_file)])
    assert ServeConfig.from_env(api_key=read_api_key(from_file)).api_key == "s3cret-from-file"
    plain = parser.parse_args(["--checkpoint", "x"])
    assert read_api_key(plain) is None and ServeConfig.from_env(api_key=read_api_key(plain)).api_key == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert ServeConfig.from_env(api_key=read_api_key(plain)).api_key is None
    with pytest.raises(SystemExit):  # one source on the command line
        parser.parse_args(["--checkpoint", "x", "--api-key", "k", "--api-key-file", str(key_file)])
    with pytest.raises(ValueError, match="--api-key-file .*cannot read"):
        read_api_key(parser.parse_args(["--checkpoint", "x", "--api-key-file", str(tmp_path / "missing")]))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="--api-key-file .*empty"):
        read_api_key(parser.parse_args(["--checkpoint", "x", "--api-key-file", str(tmp_path / "empty")]))


def test_derived_seeds_stay_in_range_at_the_top_of_it(client):
    """n > 1 gives choice k the seed seed + k: at seed 2**64 - 1 that wraps instead of failing."""
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "n": 3, "seed": 2**64 - 1,
                                             "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
