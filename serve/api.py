"""The OpenAI-compatible HTTP server: ``create_app(engine, tokenizer, config)``.

Routes
    POST /v1/completions, POST /v1/chat/completions   (``stream: true`` = Server-Sent Events)
    GET  /v1/models
    GET  /health (liveness), /ready (model loaded, not draining), /metrics (Prometheus)

The path of a request: API key -> body size -> JSON -> model name ->
parameters -> input policy -> retrieval (``--docs``) -> chat template /
tokenize -> context-length check -> admission (429 when the queue is full) ->
the continuous-batching ``AsyncEngine`` -> output policy (blocked phrases,
length, JSON schema) -> OpenAI response or SSE chunks with ``usage``.

Every rejection uses OpenAI's error body ``{"error": {"message", "type",
"param", "code"}}`` and is counted in ``tritium_errors_total{kind}``.  A client
that goes away (closed stream or abandoned non-streamed request) has its
generation aborted, which frees its KV blocks at the engine's next step.

Faults stay with their request: a failure in one request's sampling,
detokenizing, stop checks, logprobs or output policy ends that request alone
(500 ``generation_failed``; on a stream an error event, then ``[DONE]``).  An
engine that fails for good turns ``/health`` and ``/ready`` to 503 and calls
``exit_hook`` so ``tritium serve`` exits non-zero.  ``drain`` is the shutdown
path: 503 to new requests, a grace period, then a clean 503 to the rest.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritium.serve.detokenizer import bytes_to_token_text, token_bytes
from tritium.serve.metrics import ServeMetrics
from tritium.serve.policy import Policy, PolicyViolation
from tritium.serve.protocol import (
    SSE_DONE,
    ChunkWriter,
    ParsedRequest,
    ServeError,
    bad_request,
    error_body,
    full_response,
    new_id,
    parse_json,
    parse_request,
    sampling_error_param,
    sse,
    usage,
)
from tritium.serve.sampling import offset_seed

API_KEY_ENV = "TRITIUM_API_KEY"


@dataclass
class ServeConfig:
    model_name: str = "tritium"  # the id /v1/models lists and requests must name (or omit)
    api_key: str | None = None  # bearer token every /v1 route requires; None = no key (see from_env)
    max_tokens_cap: int = 512  # largest max_tokens a request may ask for; also the chat default
    default_completion_tokens: int = 16  # /v1/completions default max_tokens (OpenAI's default)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 64  # requests that may wait for a batch slot beyond the running ones; more get 429
    retry_after_s: int = 1  # Retry-After header of a 429
    max_n: int = 8  # most choices per request (n x prompts)
    policy_file: str | None = None  # YAML/JSON guardrail policy (tritium.serve.policy); None = no policy
    docs_dir: str | None = None  # folder of .txt/.md files for retrieval; None = off
    retrieval_top_k: int = 3  # chunks injected per request
    retrieval_chunk_chars: int = 800  # chunk size when indexing docs_dir
    shutdown_grace_s: float = 10.0  # on shutdown, in-flight requests get this long to finish, then are aborted
    context_length: int | None = None  # prompt + completion limit; None = the engine's max_model_len

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "default_completion_tokens", "max_body_bytes", "max_n", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_queue", "retrieval_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ServeConfig.{name} must be an integer >= 0, got {value!r}")
        self.default_completion_tokens = min(self.default_completion_tokens, self.max_tokens_cap)
        if not self.model_name:
            raise ValueError("ServeConfig.model_name must be a non-empty string")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServeConfig.api_key must be None (no key) or a non-empty string")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"ServeConfig.shutdown_grace_s must be >= 0, got {self.shutdown_grace_s!r}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"ServeConfig.context_length must be >= 2 or None, got {self.context_length!r}")

    @classmethod
    def from_env(cls, **kwargs: Any) -> ServeConfig:
        """Like the constructor, but ``api_key`` defaults to $TRITIUM_API_KEY."""
        if kwargs.get("api_key") is None and os.environ.get(API_KEY_ENV):
            kwargs["api_key"] = os.environ[API_KEY_ENV]
        return cls(**kwargs)


@dataclass
class _Event:
    """One step of one choice, after the output policy."""

    index: int  # choice index
    text: str = ""  # text to send now
    logprobs: list[dict[str, Any]] | None = None  # entries for the tokens in this step
    finish_reason: str | None = None  # set on the choice's last event
    completion_tokens: int = 0  # tokens generated so far for this choice
    error: ServeError | None = None  # the choice failed (e.g. JSON schema after retries)
    cached_tokens: int = 0  # prompt tokens this choice found in the prefix cache


@dataclass(eq=False)  # identity semantics: jobs live in a set
class _Job:
    """One HTTP request's generations: one engine request per (prompt, n) choice."""

    rid: str
    req: ParsedRequest
    prompts: list[list[int]]  # token ids per prompt
    params: list[Any]  # SamplingParams per prompt
    t0: float  # arrival time (perf_counter)
    endpoint: str
    extra: dict[str, Any] = field(default_factory=dict)  # response extensions ("sources")
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task] = field(default_factory=list)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)  # per choice: prompt tokens from the prefix cache
    done: bool = False  # the stream reached data: [DONE]
    ended: set[int] = field(default_factory=set)  # choices whose last event (finish or error) is queued
    started: set[int] = field(default_factory=set)  # choices the engine accepted (an output arrived)

    def put(self, event: _Event) -> None:
        if event.error is not None or event.finish_reason:
            self.ended.add(event.index)
        self.queue.put_nowait(event)

    def fail_remaining(self, error: ServeError) -> None:
        """End every unfinished choice with ``error`` (shutdown after the grace period)."""
        self.cancel()
        for index in range(self.num_choices):
            if index not in self.ended:
                self.put(_Event(index, error=error))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def cached_prompt_tokens(self) -> int:
        """OpenAI's ``prompt_tokens_details.cached_tokens``: per prompt (counted once, like
        ``prompt_tokens``), the most prompt tokens any of its ``n`` choices found in the prefix cache."""
        n = self.req.n
        return sum(max((self.cached_tokens.get(p * n + k, 0) for k in range(n)), default=0)
                   for p in range(len(self.prompts)))

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, sum(self.completion_tokens.values()), self.cached_prompt_tokens)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.req.n

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


class _Server:
    def __init__(self, engine: Any, tokenizer: Any, config: ServeConfig):
        self.config = config
        self.tokenizer = tokenizer
        self.engine = _as_async_engine(engine)
        self.llm = getattr(self.engine, "engine", engine)
        self.context_length = config.context_length or int(getattr(self.llm, "max_model_len", 0) or 0)
        if not self.context_length:
            raise ValueError("cannot tell the model's context length: pass ServeConfig.context_length")
        self.capacity = int(getattr(self.llm, "max_num_seqs", 0) or 0) + config.max_queue
        self.policy = Policy.load(config.policy_file) if config.policy_file else None
        self._policy_grammar: Any = None  # the policy's schema as a StructuredOutput; False = not compilable
        self._warm_grammar_backend()
        self.docs = None
        if config.docs_dir:
            from tritium.serve.retrieval import DocIndex

            self.docs = DocIndex.from_dir(config.docs_dir, chunk_chars=config.retrieval_chunk_chars)
        self.metrics = ServeMetrics(self._stats)
        self.in_flight = 0  # choices admitted and not finished
        self.jobs: set[_Job] = set()  # admitted requests whose response is not finished
        self.ready = False
        self.draining = False
        self.fatal_error: str | None = None  # the engine failed for good; the process should exit non-zero
        self.exit_hook: Any = None  # set by `tritium serve`: asks uvicorn to exit (after a fatal engine error)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once started
        if hasattr(self.engine, "on_fatal"):
            self.engine.on_fatal = self._engine_failed

    def _engine_failed(self, exc: BaseException) -> None:
        # Runs on the engine thread: only flips flags and asks the server to exit.
        self.fatal_error = f"{type(exc).__name__}: {exc}"
        self.ready = False
        if self.exit_hook is not None:
            self.exit_hook()

    @property
    def engine_error(self) -> str | None:
        return self.fatal_error or getattr(self.engine, "error", None)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting (503), give in-flight requests ``grace_s`` to finish, then end the rest with a
        503 error (JSON, or an SSE error event and ``data: [DONE]``) and wait for those answers to go out."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.jobs:
            error = ServeError(503, f"the server is shutting down; the request did not finish within the "
                               f"{grace_s:g} s shutdown grace period", kind="shutting_down", code="shutting_down")
            for job in list(self.jobs):
                job.fail_remaining(error)
            deadline = time.monotonic() + 5
            while self.jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    def _stats(self) -> dict[str, Any]:
        return self.engine.stats() if hasattr(self.engine, "stats") else self.llm.stats()

    # ------------------------------------------------------------------ request -> job
    def check_api_key(self, request: Any) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ServeError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                             f"(the server's --api-key / ${API_KEY_ENV}).", kind="auth", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ServeError(401, "Incorrect API key provided.", kind="auth", code="invalid_api_key")

    async def read_json(self, request: Any) -> Any:
        limit = self.config.max_body_bytes
        too_large = ServeError(413, f"request body is larger than the server limit of {limit} bytes",
                               kind="body_too_large", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def prepare(self, body: Any, *, chat: bool, endpoint: str, t0: float) -> _Job:
        from tritium.serve.sampling import SamplingParams

        req = parse_request(body, chat=chat, max_n=self.config.max_n)
        if req.model is not None and req.model != self.config.model_name:
            raise ServeError(404, f"The model '{req.model}' does not exist; this server serves "
                             f"'{self.config.model_name}' (see GET /v1/models).", kind="model_not_found",
                             param="model", code="model_not_found")
        cap = self.config.max_tokens_cap
        if req.max_tokens is not None and req.max_tokens > cap:
            raise bad_request(f"max_tokens={req.max_tokens} exceeds this server's cap of {cap} tokens",
                              "max_tokens")
        if len(req.prompts) * req.n > self.config.max_n:
            raise bad_request(f"{len(req.prompts)} prompt(s) x n={req.n} choices exceeds this server's limit of "
                              f"{self.config.max_n} choices per request", "n")

        extra: dict[str, Any] = {}
        texts = [m["content"] for m in req.messages] if chat else [p for p in req.prompts if isinstance(p, str)]
        self._check_policy(lambda: self.policy.check_input(texts, [m["role"] for m in req.messages]
                                                           if chat else None))
        hits = []
        if self.docs is not None and req.use_retrieval and self.config.retrieval_top_k:
            query = (next((m["content"] for m in reversed(req.messages) if m["role"] == "user"), "")
                     if chat else " ".join(texts))
            hits = self.docs.search(query, self.config.retrieval_top_k)
            extra["sources"] = [h.to_dict() for h in hits]
        prompt_ids = self._encode(req, hits)
        for num_tokens in map(len, prompt_ids):
            self._check_policy(lambda n=num_tokens: self.policy.check_prompt_tokens(n))

        structured = self._structured(req)
        params = []
        for ids in prompt_ids:
            room = self.context_length - len(ids)
            if room < 1:
                raise ServeError(400, f"This model's maximum context length is {self.context_length} tokens, "
                                 f"but the prompt has {len(ids)} tokens. Please shorten the prompt.",
                                 kind="context_length", param="messages" if chat else "prompt",
                                 code="context_length_exceeded")
            if req.max_tokens is not None:
                max_tokens = req.max_tokens
                if max_tokens > room:
                    raise ServeError(400, f"This model's maximum context length is {self.context_length} tokens. "
                                     f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                     f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                     "max_tokens.", kind="context_length", param="max_tokens",
                                     code="context_length_exceeded")
            else:
                default = cap if chat else self.config.default_completion_tokens
                max_tokens = min(default, room)
            sampling = dict(req.sampling, structured=structured)
            if chat:
                from tritium.model.chat import stop_token_ids

                sampling["stop_token_ids"] = tuple(sampling.get("stop_token_ids", ())) + tuple(
                    stop_token_ids(self.tokenizer))
            try:
                p = SamplingParams(max_tokens=max_tokens, logprobs=req.logprobs, **sampling)
            except (ValueError, TypeError) as exc:
                raise bad_request(str(exc), sampling_error_param(exc)) from None
            validate = getattr(self.llm, "validate_request", None)
            if validate is not None:
                try:
                    validate(ids, p)
                except ValueError as exc:
                    raise bad_request(str(exc), "messages" if chat else "prompt") from None
            params.append(p)
        return _Job(rid=new_id(chat), req=req, prompts=prompt_ids, params=params, t0=t0,
                    endpoint=endpoint, extra=extra)

    def _warm_grammar_backend(self) -> None:
        """Import xgrammar and describe the vocabulary to it off the request path (the import alone takes
        seconds on a busy CPU), so the first structured-output request does not stall the event loop."""
        import importlib.util

        if importlib.util.find_spec("xgrammar") is None:
            return

        def warm() -> None:
            from tritium.serve.grammar import backend_for

            with contextlib.suppress(Exception):
                backend_for(self.tokenizer)
        threading.Thread(target=warm, name="tritium-grammar-warmup", daemon=True).start()

    def _structured(self, req: ParsedRequest) -> Any:
        """The request's grammar constraint, compiled now so a spec xgrammar rejects is a 400 naming its field
        (the engine then hits the compile cache).  Without one, the output policy's JSON schema becomes the
        constraint when it compiles (constrain rather than retry; the retry loop stays as a safety net)."""
        from tritium.serve.grammar import StructuredOutput, backend_for

        if req.structured is None:
            if self.policy is None or not self.policy.wants_json:
                return None
            if self._policy_grammar is None:
                try:
                    self._policy_grammar = StructuredOutput.json_schema(self.policy.output.json_schema)
                    backend_for(self.tokenizer).compile(self._policy_grammar)
                except (ValueError, ImportError):
                    self._policy_grammar = False  # validated and retried only
            return self._policy_grammar or None
        try:
            backend_for(self.tokenizer).compile(req.structured)
        except ValueError as exc:
            raise bad_request(f"{req.structured_param}: {exc}", req.structured_param) from None
        except ImportError as exc:
            raise bad_request(str(exc), req.structured_param, "unsupported_parameter") from None
        return req.structured

    def _check_policy(self, check: Any) -> None:
        if self.policy is None:
            return
        try:
            check()
        except PolicyViolation as exc:
            self.metrics.policy_violations.labels(exc.check).inc()
            raise ServeError(400, f"request rejected by the server policy: {exc.message}", kind="policy",
                             code=exc.check) from None

    def _encode(self, req: ParsedRequest, hits: list[Any]) -> list[list[int]]:
        from tritium.serve import retrieval

        if req.chat:
            from tritium.model.chat import encode_prompt

            messages = retrieval.augment_messages(req.messages, hits)
            try:
                return [encode_prompt(self.tokenizer, messages)]
            except (ValueError, TypeError) as exc:
                raise bad_request(str(exc), "messages") from None
        out = []
        for prompt in req.prompts:
            if isinstance(prompt, str):
                # Untrusted text cannot smuggle in chat-marker tokens; send token ids to use them on purpose.
                out.append(self.tokenizer.encode(retrieval.augment_prompt(prompt, hits), bos=True,
                                                 allow_special=False))
            else:
                bad = [t for t in prompt if t >= self.tokenizer.vocab_size]
                if bad:
                    raise bad_request(f"prompt token id(s) {bad[:5]} are outside the vocabulary "
                                      f"(size {self.tokenizer.vocab_size})", "prompt")
                if hits:
                    ctx = self.tokenizer.encode(retrieval.format_context(hits) + "\n\n", bos=True,
                                                allow_special=False)
                    prompt = ctx + prompt
                out.append(list(prompt))
        if not all(out):
            raise bad_request("prompt must not be empty", "prompt")
        return out

    # ------------------------------------------------------------------ running a job
    def admit(self, job: _Job) -> None:
        if self.engine_error is not None:
            raise ServeError(503, f"the engine failed and the server is exiting: {self.engine_error}",
                             kind="engine_failed", code="engine_failed")
        if self.draining:
            raise ServeError(503, "the server is shutting down", kind="shutting_down", code="shutting_down")
        if self.in_flight + job.num_choices > self.capacity:
            raise ServeError(429, f"the server is at capacity ({self.in_flight} requests in flight, queue limit "
                             f"{self.config.max_queue}); retry after {self.config.retry_after_s} s",
                             kind="queue_full", code="queue_full",
                             headers={"Retry-After": str(self.config.retry_after_s)})
        self.in_flight += job.num_choices
        self.jobs.add(job)
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        for p_index, (ids, params) in enumerate(zip(job.prompts, job.params)):
            for k in range(job.req.n):
                index = p_index * job.req.n + k
                choice_params = params
                if job.req.n > 1 and params.seed is not None:
                    import dataclasses

                    choice_params = dataclasses.replace(params, seed=offset_seed(params.seed, k))  # distinct
                task = asyncio.create_task(self._run_choice(job, index, ids, choice_params))
                task.add_done_callback(self._choice_done)
                job.tasks.append(task)

    async def _run_choice(self, job: _Job, index: int, ids: list[int], params: Any) -> None:
        try:
            if self.policy is not None and self.policy.wants_json:
                job.put(await self._generate_json(job, index, ids, params))
            else:
                async with contextlib.aclosing(self._generate(job, index, ids, params, attempt=0)) as events:
                    async for event in events:
                        job.put(event)
        except ServeError as exc:
            job.put(_Event(index, error=exc))
        except asyncio.CancelledError:
            raise
        except ValueError as exc:  # the engine refused the request (400), or a fault once it ran (500)
            job.put(_Event(index, error=_request_failed(exc) if index in job.started else bad_request(str(exc))))
        except RuntimeError as exc:
            if self.engine_error is not None:
                error = ServeError(503, f"the engine failed and the server is exiting: {self.engine_error}",
                                   kind="engine_failed", code="engine_failed")
            elif self.draining or "shutting down" in str(exc):
                error = ServeError(503, "the server is shutting down", kind="shutting_down")
            else:
                error = _request_failed(exc)
            job.put(_Event(index, error=error))
        except Exception as exc:  # noqa: BLE001 - this choice alone fails, as a 500; never lost
            job.put(_Event(index, error=_request_failed(exc)))

    def _choice_done(self, task: asyncio.Task) -> None:
        # A done-callback, not a finally: a task cancelled before it ever ran skips its body.
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    async def _generate(self, job: _Job, index: int, ids: list[int], params: Any,
                        attempt: int) -> AsyncIterator[_Event]:
        """Engine outputs of one choice, through the output policy's streaming filter."""
        request_id = f"{job.rid}-{index}" + (f"-r{attempt}" if attempt else "")
        screen = self.policy.output_filter() if self.policy is not None else None
        last_time = None
        finished = False
        stream = self.engine.generate(request_id, ids, params)
        if inspect.isawaitable(stream):
            stream = await stream
        try:
            async for out in stream:
                job.started.add(index)
                if getattr(out, "error", None):
                    finished = True
                    raise _request_failed(out.error)
                now = time.perf_counter()
                new = len(out.new_token_ids)
                if new:
                    if last_time is None:
                        self.metrics.ttft.observe(now - job.t0)
                    else:
                        for _ in range(new):
                            self.metrics.itl.observe((now - last_time) / new)
                    last_time = now
                    self.metrics.completion_tokens.inc(new)
                text = out.text_delta
                finish = out.finish_reason if out.finished else None
                if screen is not None:
                    text = screen.feed(text)
                    if out.finished:
                        text += screen.finish()
                    if screen.stopped and not out.finished:
                        self.engine.abort(request_id)
                    if screen.finish_reason and (screen.stopped or out.finished):
                        finish = screen.finish_reason
                finished = out.finished or finish is not None
                entries = self._logprob_entries(out, new, params) if params.logprobs else None
                yield _Event(index, text, entries, finish, out.completion_tokens,
                             cached_tokens=getattr(out, "cached_tokens", 0))
                if finished:
                    break
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    self.engine.abort(request_id)
            if hasattr(stream, "aclose"):
                with contextlib.suppress(Exception):
                    await stream.aclose()
            if finished:
                self.metrics.duration.observe(time.perf_counter() - job.t0)
            if screen is not None:
                for check in screen.violations:
                    self.metrics.policy_violations.labels(check).inc()

    async def _generate_json(self, job: _Job, index: int, ids: list[int], params: Any) -> _Event:
        """Whole answers validated against the policy's JSON schema, re-sampled up to json_retries times."""
        import dataclasses

        attempts = self.policy.output.json_retries + 1
        reason = ""
        for attempt in range(attempts):
            if attempt and params.seed is not None:
                params = dataclasses.replace(params, seed=offset_seed(params.seed, 1000 * attempt))
            text, entries, finish, tokens, cached = "", [], None, 0, 0
            async with contextlib.aclosing(self._generate(job, index, ids, params, attempt)) as events:
                async for event in events:
                    text += event.text
                    entries += event.logprobs or []
                    finish, tokens, cached = event.finish_reason, event.completion_tokens, event.cached_tokens
            reason = self.policy.validate_json(text)
            if reason is None:
                return _Event(index, text, entries if params.logprobs else None, finish, tokens, cached_tokens=cached)
            self.metrics.policy_violations.labels("output_json_schema").inc()
        raise ServeError(422, f"the model's answer failed the server's JSON schema after {attempts} attempt(s): "
                         f"{reason}", kind="policy", code="output_json_schema")

    def _logprob_entries(self, out: Any, new: int, params: Any) -> list[dict[str, Any]] | None:
        """One entry per new token, from the token's own bytes (a byte-fallback piece is its one byte),
        so the ``bytes`` of a reply's tokens concatenate to the UTF-8 of its text."""
        if not out.logprobs or not new:
            return None
        pairs = list(zip(out.token_ids[-new:], out.logprobs[-new:], strict=True))
        stops = {*params.stop_token_ids, self.tokenizer.eos_id, getattr(self.tokenizer, "end_of_turn_id", None)}
        if out.finish_reason == "stop" and pairs and pairs[-1][0] in stops:
            pairs.pop()  # like OpenAI: the stop token is not part of the answer's logprobs
        entries = []
        for token_id, logprob in pairs:
            data = token_bytes(self.tokenizer, token_id)
            # JSON has no -inf/NaN: OpenAI reports an impossible token as -9999.0
            value = float(logprob) if math.isfinite(logprob) else -9999.0
            entries.append({"token": bytes_to_token_text(data), "logprob": max(value, -9999.0),
                            "bytes": list(data), "top_logprobs": []})
        return entries

    async def events(self, job: _Job) -> AsyncIterator[_Event]:
        """Events of every choice in arrival order, until each choice has finished or failed."""
        remaining = job.num_choices
        while remaining:
            event = await job.queue.get()
            if event.error is not None or event.finish_reason:
                remaining -= 1
            if event.error is None:
                job.completion_tokens[event.index] = event.completion_tokens
                job.cached_tokens[event.index] = max(job.cached_tokens.get(event.index, 0), event.cached_tokens)
            if event.finish_reason:
                self.metrics.finish_reasons.labels(event.finish_reason).inc()
            yield event

    # ------------------------------------------------------------------ responses
    async def complete(self, job: _Job, request: Any) -> dict[str, Any]:
        """Run a non-streamed job; a client that disconnects first cancels it."""
        async def collect() -> dict[str, Any]:
            choices = {i: {"index": i, "text": "", "finish_reason": None, "logprobs": None}
                       for i in range(job.num_choices)}
            async for event in self.events(job):
                if event.error is not None:
                    raise event.error
                choice = choices[event.index]
                choice["text"] += event.text
                if event.logprobs:
                    choice["logprobs"] = (choice["logprobs"] or []) + event.logprobs
                if event.finish_reason:
                    choice["finish_reason"] = event.finish_reason
            return full_response(job.req, job.rid, self.config.model_name, [choices[i] for i in sorted(choices)],
                                 job.usage(), job.extra)

        collector = asyncio.create_task(collect())
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if collector in done:
                return collector.result()
            self.metrics.errors.labels("client_disconnected").inc()
            raise ServeError(499, "client disconnected", kind="client_disconnected")
        finally:
            watcher.cancel()
            collector.cancel()
            job.cancel()
            self.jobs.discard(job)

    async def stream(self, job: _Job) -> AsyncIterator[bytes]:
        writer = ChunkWriter(job.req, job.rid, self.config.model_name)
        for index in range(job.num_choices):
            chunk = writer.role(index, **job.extra)
            if chunk is not None:
                yield sse(chunk)
        finished = 0
        async for event in self.events(job):
            if event.error is not None:
                self._count_error(event.error)
                yield sse(event.error.body())
                finished += 1
                continue
            if event.text or event.logprobs:
                yield sse(writer.delta(event.index, event.text, event.logprobs))
            if event.finish_reason:
                finished += 1
                chunk = writer.delta(event.index, "", None, event.finish_reason)
                if finished == job.num_choices and not job.req.include_usage:
                    # Usage on the last chunk even without include_usage: clients that read it get counts.
                    chunk["usage"] = job.usage()
                    chunk.update(job.extra)
                yield sse(chunk)
        if job.req.include_usage:
            yield sse(writer.usage_chunk(job.usage(), **job.extra))
        job.done = True
        yield SSE_DONE

    def _count_error(self, exc: ServeError) -> None:
        self.metrics.errors.labels(exc.kind).inc()


def _request_failed(exc: BaseException | str) -> ServeError:
    """The 500 for a fault in handling one request (the server keeps serving the others)."""
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return ServeError(500, f"generation failed for this request: {reason}", kind="internal",
                      code="generation_failed")


def _as_async_engine(engine: Any) -> Any:
    """An ``AsyncEngine`` for an ``LLMEngine`` (or the engine itself if it already is one)."""
    if hasattr(engine, "generate") and hasattr(engine, "abort"):
        return engine
    from tritium.serve.engine import AsyncEngine

    return AsyncEngine(engine)


async def _wait_disconnect(request: Any) -> None:
    # After the body is read, the next ASGI message is http.disconnect when the client goes away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Any, tokenizer: Any, config: ServeConfig | None = None) -> Any:
    """The FastAPI app serving ``engine`` (an ``LLMEngine`` or ``AsyncEngine``)."""

    config = config or ServeConfig.from_env()
    server = _Server(engine, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.engine.start()
        server.ready = True
        server.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            server.ready = False
            # `tritium serve` drains on the first signal, while connections are still open; a server
            # stopped otherwise drains here (a no-op when nothing is left).
            await server.drain(config.shutdown_grace_s)
            await asyncio.to_thread(server.engine.shutdown, graceful=False)

    app = FastAPI(title="tritium", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    def error_response(exc: ServeError) -> JSONResponse:
        if exc.kind != "client_disconnected":
            server._count_error(exc)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            server.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        server.metrics.errors.labels("not_found" if exc.status_code == 404 else "invalid_request").inc()
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None,
                                       "not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        server.metrics.errors.labels("internal").inc()
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    async def handle(request: Request, chat: bool) -> Any:
        endpoint = request.url.path
        t0 = time.perf_counter()  # arrival: TTFT and request duration count from here
        server.check_api_key(request)
        body = await server.read_json(request)
        job = server.prepare(body, chat=chat, endpoint=endpoint, t0=t0)
        server.admit(job)
        if not job.req.stream:
            try:
                result = await server.complete(job, request)
            except ServeError as exc:
                if exc.kind == "client_disconnected":
                    return Response(status_code=499)
                raise
            server.metrics.requests.labels(endpoint, "200").inc()
            return JSONResponse(result)
        server.metrics.requests.labels(endpoint, "200").inc()
        return _SSEResponse(server.stream(job), job, server)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        server.check_api_key(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "tritium", "max_model_len": server.context_length}]}

    @app.get("/health")
    async def health() -> Any:
        # Liveness: 503 once the engine has failed for good (the process is exiting), so a supervisor
        # never sees a healthy server that answers every request with an error.
        if server.engine_error is not None:
            return JSONResponse({"status": "error", "error": server.engine_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        if server.engine_error is not None:
            return JSONResponse({"status": "error", "error": server.engine_error}, status_code=503)
        if server.ready and not server.draining:
            return {"status": "ready", "model": config.model_name}
        return JSONResponse({"status": "draining" if server.draining else "starting"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Any:
        payload, content_type = server.metrics.render()
        return Response(payload, media_type=content_type)

    class _SSEResponse(StreamingResponse):
        """SSE whose generations are cancelled however the response ends (done, error, disconnect)."""

        def __init__(self, body: AsyncIterator[bytes], job: _Job, srv: _Server):
            super().__init__(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job
            self.srv = srv

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                # Starlette returns normally when it notices a disconnect (it cancels the body
                # iterator), so "finished" is judged by whether [DONE] went out.
                self.srv.jobs.discard(self.job)
                if not self.job.done:
                    self.srv.metrics.errors.labels("client_disconnected").inc()
                    self.job.cancel()
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()

    return app
