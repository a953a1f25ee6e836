"""Continuous batching over a paged KV cache: ``LLMEngine`` and its asyncio bridge ``AsyncEngine``.

The engine is the model runner around three parts that know nothing of the model (vLLM's split):

* ``serve/scheduler.Scheduler`` decides who runs each step: decodes first, then chunked prefills
  under a token budget, FIFO admission, preemption of the newest request when blocks run out
  (see its docstring for the policy);
* ``serve/block_pool.BlockManager`` decides which KV blocks each request owns;
* ``serve/kv_cache.PagedKVCache`` holds the key/value tensors and attends through
  ``flash_attn_with_kvcache``.

Each ``step()`` takes the scheduler's plan, runs one forward pass for the decodes and one for the
prefill chunks, then samples for every row whose tokens are all computed, applies the stop rules
(one request at a time, in ``_emit``) and releases the blocks of finished requests.

A preempted request keeps its ``SequenceState`` (output so far, text already streamed, its random
generator), so its stream continues where it stopped.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch

from tritium.serve.block_pool import BlockManager
from tritium.serve.kv_cache import PagedKVCache
from tritium.serve.sampling import SamplingParams
from tritium.serve.scheduler import Scheduler, SchedulerRequest
from tritium.serve.sequence import SequenceState, check_prompt, paged_forward, sample_for
from tritium.serve.speculative import SpeculativeDecoder


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced by this step (a final stop token included)
    text_delta: str  # text released by this step ("" while held back)
    token_ids: list[int]  # all completion tokens so far
    text: str  # all completion text so far (== concatenation of the deltas)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: list[float] | None  # aligned with token_ids when requested
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's cached_tokens)
    error: str | None = None  # set with finish_reason "error": why this request (alone) failed


class _Request(SchedulerRequest):
    """A request as the engine sees it: the scheduler's counters plus its decoding state."""

    def __init__(self, request_id: str, state: SequenceState, arrival: int) -> None:
        super().__init__(request_id, arrival)
        self.state = state
        self.new_token_ids: list[int] = []  # since the last output
        self.text_delta = ""

    @property
    def num_tokens(self) -> int:
        return len(self.state.prompt_ids) + len(self.state.output_ids)

    @property
    def tokens(self) -> list[int]:
        return self.state.all_ids

    def token_ids(self) -> list[int]:
        return self.state.all_ids

    def token_slice(self, start: int, count: int) -> list[int]:
        """tokens[start:start + count] without concatenating prompt and output (O(count) per step)."""
        prompt, output = self.state.prompt_ids, self.state.output_ids
        if start >= len(prompt):
            return output[start - len(prompt):start - len(prompt) + count]
        head = prompt[start:start + count]
        return head + output[:count - len(head)]

    def output(self) -> RequestOutput:
        state = self.state
        out = RequestOutput(
            request_id=self.request_id, new_token_ids=self.new_token_ids, text_delta=self.text_delta,
            token_ids=list(state.output_ids), text=state.text, finished=state.finished,
            finish_reason=state.finish_reason,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            prompt_tokens=len(state.prompt_ids), completion_tokens=len(state.output_ids),
            cached_tokens=self.num_cached_tokens, error=state.error)
        self.new_token_ids, self.text_delta = [], ""
        return out


def default_num_blocks(model: torch.nn.Module, block_size: int, max_num_seqs: int,
                       memory_fraction: float = 0.9, cpu_bytes: int = 2 << 30) -> int:
    """Blocks for ``max_num_seqs`` full-length sequences, capped by memory: ``memory_fraction`` of free
    CUDA memory, or ``cpu_bytes`` on CPU."""
    cfg = model.config
    param = next(model.parameters())
    per_block = PagedKVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim,
                                             param.dtype)
    wanted = max_num_seqs * -(-cfg.max_seq_len // block_size)
    if param.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(param.device)
        budget = int(free * memory_fraction)
    else:
        budget = cpu_bytes
    return max(1, min(wanted, budget // per_block))


# What one more forward pass costs, in padded prompt tokens: measured on the 2-core CPU box with the
# tiny preset, a forward's fixed cost (~3 ms) is ~40 prefill tokens (~75 us each). On a GPU a token is
# far cheaper than a forward, so there this errs towards more passes; either way it only splits a
# prefill where the padding saved pays for the pass.
FORWARD_COST_TOKENS = {"cpu": 40, "cuda": 1024}


def _padding_groups(chunks: list[tuple[_Request, int]], forward_cost: int = 40) -> list[list[tuple[_Request, int]]]:
    """Split prefill chunks into forward passes so that padded tokens + ``forward_cost`` per pass is least.

    Rows of one pass are right-padded to its longest chunk; a 16-token prompt beside a 128-token one
    would compute 112 pad positions. With the chunks sorted by length the best split into consecutive
    runs is a small dynamic program (at most max_num_seqs chunks).
    """
    ordered = sorted(chunks, key=lambda rc: -rc[1])
    n = len(ordered)
    best = [0] + [None] * n  # best[j]: least cost of the first j chunks
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last pass = ordered[i:j], padded to ordered[i]'s length
            cost = best[i] + forward_cost + (j - i) * ordered[i][1]
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(ordered[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class LLMEngine:
    """Continuous-batching engine over one model; single-threaded (``AsyncEngine`` adds the thread)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 32, max_prefill_tokens: int = 512, enable_prefix_caching: bool = True,
                 speculative: SpeculativeDecoder | None = None) -> None:
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLMEngine: {name} must be a positive integer, got {value!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        self.max_model_len = self.config.max_seq_len
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, max_num_seqs)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens)
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self._arrivals = itertools.count()
        self._requests: dict[str, _Request] = {}
        self._aborted: list[_Request] = []  # finished by abort_request, reported by the next step()
        self._counters = {"num_finished": 0, "tokens_generated": 0, "prompt_tokens_processed": 0, "num_steps": 0,
                          "num_request_errors": 0, "num_step_errors": 0}
        # Batched-forward failures in a row (reset by a good step); AsyncEngine gives up past a limit.
        self.consecutive_step_errors = 0
        self.last_step_error: str | None = None
        # Speculative decoding (serve/speculative.py): decodes with a proposal (n-gram or draft model, whose
        # paged cache follows this engine's blocks) verify it in one pass.
        self.speculative = speculative
        if speculative is not None:
            speculative.attach_engine(self)

    # ------------------------------------------------------------------ requests
    def validate_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run (pure; safe from any thread)."""
        check_prompt(list(prompt_ids), params, self.max_model_len, self.config.vocab_size)
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if len(prompt_ids) + params.max_tokens > capacity:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"whole KV cache ({capacity} tokens); lower max_tokens or raise num_blocks")

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> None:
        params = params if params is not None else SamplingParams()
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        prompt_ids = [int(t) for t in prompt_ids]
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        self.validate_request(prompt_ids, params)
        request = _Request(request_id, SequenceState(prompt_ids, params, self.tokenizer, self.device),
                           next(self._arrivals))
        self._requests[request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> bool:
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.abort(request)
        request.text_delta += request.state.abort()
        self._aborted.append(request)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def stats(self) -> dict:
        scheduler = self.scheduler
        return dict(num_waiting=len(scheduler.waiting), num_running=len(scheduler.running),
                    num_prefilling=scheduler.num_prefilling,
                    kv_blocks_used=self.blocks.num_used_blocks, kv_blocks_total=self.blocks.num_blocks,
                    kv_block_size=self.blocks.block_size, max_num_seqs=self.max_num_seqs,
                    num_preemptions=scheduler.num_preemptions,
                    prefix_cache_queries=scheduler.prefix_cache_queries,
                    prefix_cache_hits=scheduler.prefix_cache_hits, **self._counters,
                    **({f"spec_{k}": v for k, v in self.speculative.engine_stats().items()}
                       if self.speculative is not None else {}))

    # ------------------------------------------------------------------ model runner
    def _forward(self, rows: list[tuple[_Request, int]]) -> torch.Tensor:
        """Feed ``chunk`` new tokens of each request (right-padded); logits (B, V) at each chunk's end."""
        T = max(chunk for _, chunk in rows)
        order = None
        if T == 1 and len(rows) > 1:
            # Decodes go longest first: the cache's attention then reads the short rows' keys in a
            # bucket of their own instead of padding every row to the longest (kernels/decode.py).
            order = sorted(range(len(rows)), key=lambda i: -rows[i][0].num_computed)
            rows = [rows[i] for i in order]
        logits = paged_forward(self.model, self.cache, [self.blocks.table(r.request_id) for r, _ in rows],
                               [r.token_slice(r.num_computed, chunk) for r, chunk in rows],
                               [r.num_computed for r, _ in rows], self.max_model_len, self.device)
        if order is not None and order != sorted(order):  # back to the caller's row order
            logits = torch.empty_like(logits).index_copy_(0, torch.tensor(order, device=logits.device), logits)
        return logits

    def _emit(self, request: _Request, token: int, logprob: float | None) -> None:
        """Record one sampled token for one request: stop rules, detokenized text, finishing."""
        request.text_delta += request.state.append(token, logprob)
        request.new_token_ids.append(token)
        self._counters["tokens_generated"] += 1
        if request.state.finished:
            self.scheduler.finish(request)
            self._requests.pop(request.request_id, None)
            self._counters["num_finished"] += 1

    def _fail(self, request: _Request, error: BaseException | str) -> RequestOutput:
        """Finish one request with finish_reason "error"; the others keep running."""
        request.state.fail(error)
        self.scheduler.abort(request)
        self._requests.pop(request.request_id, None)
        self._counters["num_request_errors"] += 1
        return request.output()

    def _sample_rows(self, sampled: list[tuple[_Request, torch.Tensor]]) -> list[tuple[int, float | None] | Exception]:
        """(token, logprob) per row; if the batched call fails, rows are retried one by one so only the
        row that fails gets an exception."""
        try:
            tokens, logprobs = sample_for([r.state for r, _ in sampled], torch.stack([l for _, l in sampled]))
            return list(zip(tokens, logprobs))
        except Exception:  # noqa: BLE001 - isolate the culprit below
            results: list[tuple[int, float | None] | Exception] = []
            for request, row_logits in sampled:
                try:
                    tokens, logprobs = sample_for([request.state], row_logits[None])
                    results.append((tokens[0], logprobs[0]))
                except Exception as exc:  # noqa: BLE001 - this request alone fails
                    results.append(exc)
            return results

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outputs = [r.output() for r in self._aborted]
        self._aborted.clear()
        plan = self.scheduler.schedule()
        sampled: list[tuple[_Request, torch.Tensor]] = []
        scheduled = plan.decodes + [r for r, _ in plan.prefills]  # before speculation splits the decodes
        try:
            if plan.decodes and self.speculative is not None:
                plan.decodes, verify = self.speculative.engine_split(self, plan.decodes)
                if verify:
                    outputs.extend(self.speculative.engine_step(self, verify))
            if plan.decodes:
                logits = self._forward([(r, 1) for r in plan.decodes])
                for request in plan.decodes:
                    request.num_computed += 1
                sampled.extend(zip(plan.decodes, logits.unbind(0)))  # one op, not one select per row
            for group in _padding_groups(plan.prefills, FORWARD_COST_TOKENS.get(self.device.type, 40)):
                logits = self._forward(group)
                for (request, chunk), row_logits in zip(group, logits.unbind(0)):
                    request.num_computed += chunk
                    self._counters["prompt_tokens_processed"] += chunk
                    if request.pending == 0:
                        sampled.append((request, row_logits))
        except Exception as exc:  # noqa: BLE001 - engine-wide (OOM, device error): fail this step's requests
            self._counters["num_step_errors"] += 1
            self.consecutive_step_errors += 1
            self.last_step_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            for request in dict.fromkeys(scheduled):
                if not request.state.finished:
                    outputs.append(self._fail(request, f"the batched forward pass failed: {self.last_step_error}"))
            return outputs
        self.consecutive_step_errors = 0
        self._counters["num_steps"] += 1
        for request in plan.decodes + [r for r, _ in plan.prefills]:
            # Full blocks just computed become reusable by later requests with the same prefix.
            self.blocks.commit(request.request_id, request.num_computed, request.token_slice)
        if sampled:
            for (request, _), result in zip(sampled, self._sample_rows(sampled)):
                if isinstance(result, Exception):
                    outputs.append(self._fail(request, result))
                    continue
                try:  # detokenizing and stop checks of this request alone
                    self._emit(request, *result)
                except Exception as exc:  # noqa: BLE001 - this request alone fails
                    outputs.append(self._fail(request, exc))
                    continue
                outputs.append(request.output())
        return outputs

    def run_to_completion(self) -> dict[str, RequestOutput]:
        """Step until idle; the final output of every request (tests, offline batch jobs)."""
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return final


# ---------------------------------------------------------------------------- asyncio bridge
_STOP = object()


class AsyncEngine:
    """Runs an ``LLMEngine`` on a background thread; asyncio callers stream ``RequestOutput``s.

    The engine is only ever touched by its thread: ``generate``/``abort`` enqueue commands, and outputs
    travel back through ``loop.call_soon_threadsafe`` into one asyncio.Queue per request.
    """

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05, max_step_errors: int = 3,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        # Batched forwards failing this many steps in a row = the engine is broken, not one request:
        # the thread stops, ``error`` is set and ``on_fatal`` runs (the server then reports unhealthy
        # and exits non-zero, so a supervisor restarts it).
        self.max_step_errors = max_step_errors
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._graceful = True
        self._error: BaseException | None = None
        self._stats: dict = engine.stats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._stopping:
                raise RuntimeError("AsyncEngine was shut down; create a new one")
            self._thread = threading.Thread(target=self._loop, name="tritium-engine", daemon=True)
            self._thread.start()

    def shutdown(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop the loop: graceful finishes in-flight requests first, otherwise they are aborted."""
        with self._lock:
            self._stopping, self._graceful = True, graceful
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {**self._stats, "running": self.is_running}

    @property
    def error(self) -> str | None:
        """Why the engine thread stopped for good (None while healthy)."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    # ------------------------------------------------------------------ requests
    async def generate(self, request_id: str, prompt_ids: Sequence[int],
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        params = params if params is not None else SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        self.engine.validate_request(prompt_ids, params)
        if self._error is not None:
            raise RuntimeError(f"engine stopped after an error: {self._error!r}") from self._error
        sink: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopping:
                raise RuntimeError("AsyncEngine is shutting down; not accepting requests")
            if request_id in self._sinks:
                raise ValueError(f"request_id {request_id!r} is already in the engine")
            self._sinks[request_id] = (asyncio.get_running_loop(), sink)
        self.start()
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await sink.get()
                if item is _STOP:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # consumer went away (disconnect, aclose, cancellation): free the blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    # ------------------------------------------------------------------ the thread
    def _deliver(self, request_id: str, item, last: bool) -> None:
        with self._lock:
            entry = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
        if entry is None:
            return
        loop, sink = entry
        try:
            loop.call_soon_threadsafe(sink.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed; nobody is listening
            pass

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, params = command
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except Exception as exc:  # noqa: BLE001 - reported to that caller only
                    self._deliver(request_id, exc, last=True)
            else:
                self.engine.abort_request(command[1])

    def _loop(self) -> None:
        try:
            while True:
                self._drain_commands()
                if self._stopping:
                    if not self._graceful:
                        for request_id in list(self.engine._requests):
                            self.engine.abort_request(request_id)
                    if not self._graceful or not self.engine.has_unfinished():
                        for out in self.engine.step() if self.engine.has_unfinished() else []:
                            self._deliver(out.request_id, out, last=out.finished)
                        self._stats = self.engine.stats()
                        break
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out, last=out.finished)
                    self._stats = self.engine.stats()
                    if getattr(self.engine, "consecutive_step_errors", 0) >= self.max_step_errors:
                        raise RuntimeError(f"{self.engine.consecutive_step_errors} engine steps failed in a row; "
                                           f"last: {self.engine.last_step_error}")
                else:
                    self._stats = self.engine.stats()
                    self._wakeup.wait(self.idle_wait_s)
                    self._wakeup.clear()
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it, not hang
            self._error = exc
            with self._lock:
                request_ids = list(self._sinks)
            for request_id in request_ids:
                self._deliver(request_id, RuntimeError(f"engine failed: {exc!r}"), last=True)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        with self._lock:  # anything left (e.g. an add that raced the shutdown) ends cleanly
            request_ids = list(self._sinks)
        for request_id in request_ids:
            self._deliver(request_id, _STOP, last=True)
