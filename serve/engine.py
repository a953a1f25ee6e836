"""Continuous batching over a paged KV cache: ``LLMEngine`` and its asyncio bridge ``AsyncEngine``.

Each ``step()`` is one scheduling iteration (the Orca/vLLM design):

1. Decode: every running request whose tokens are all in the cache but the
   last sampled one gets one more token.  It first needs room for one more
   key/value; when the block pool is empty the NEWEST running request is
   preempted -- its blocks are freed and it goes back to the queue, to be
   recomputed later from prompt + generated tokens (recomputation beats
   swapping for short sequences, and it never crashes).  The oldest request
   always makes progress, so nothing starves.
2. Prefill: requests still consuming their prompt, then new ones from the
   FIFO queue, get chunks of at most ``max_prefill_tokens`` tokens in total,
   so a long prompt is spread over several steps instead of stalling every
   running decode (chunked prefill, Sarathi).  A queued request is admitted
   only when blocks for its whole prompt are free and fewer than
   ``max_num_seqs`` are running; otherwise it waits.
3. Sample for every row whose tokens are all computed, apply stop rules,
   free the blocks of finished requests.

A preempted request keeps its ``SequenceState`` (output so far, text already
streamed, its random generator), so its stream continues where it stopped.
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from tritium.serve.kv_cache import PagedKVCache
from tritium.serve.sampling import SamplingParams
from tritium.serve.sequence import SequenceState, check_prompt, last_token_logits, sample_for


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
    error: str | None = None  # set with finish_reason "error": why this request (alone) failed


@dataclass(eq=False)
class _Request:
    request_id: str
    state: SequenceState
    arrival: int  # admission order; preemption picks the largest
    num_computed: int = 0  # tokens (prompt + output) whose keys/values are in the cache
    new_token_ids: list[int] = field(default_factory=list)  # since the last output
    text_delta: str = ""

    @property
    def tokens(self) -> list[int]:
        return self.state.all_ids

    def token_slice(self, start: int, count: int) -> list[int]:
        """tokens[start:start + count] without concatenating prompt and output (O(count) per step)."""
        prompt, output = self.state.prompt_ids, self.state.output_ids
        if start >= len(prompt):
            return output[start - len(prompt):start - len(prompt) + count]
        head = prompt[start:start + count]
        return head + output[:count - len(head)]

    @property
    def pending(self) -> int:
        return len(self.state.prompt_ids) + len(self.state.output_ids) - self.num_computed

    def output(self) -> RequestOutput:
        state = self.state
        out = RequestOutput(
            request_id=self.request_id, new_token_ids=self.new_token_ids, text_delta=self.text_delta,
            token_ids=list(state.output_ids), text=state.text, finished=state.finished,
            finish_reason=state.finish_reason,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            prompt_tokens=len(state.prompt_ids), completion_tokens=len(state.output_ids), error=state.error)
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


class LLMEngine:
    """Continuous-batching engine over one model; single-threaded (``AsyncEngine`` adds the thread)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 32, max_prefill_tokens: int = 512) -> None:
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
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self._watermark = max(1, num_blocks // 100)
        self._arrivals = itertools.count()
        self._waiting: list[_Request] = []  # sorted by arrival (preempted requests go back in order)
        self._running: list[_Request] = []  # sorted by arrival
        self._requests: dict[str, _Request] = {}
        self._aborted: list[_Request] = []  # finished by abort_request, reported by the next step()
        self._counters = {"num_preemptions": 0, "num_finished": 0, "tokens_generated": 0, "prompt_tokens_processed": 0,
                              "num_steps": 0, "num_request_errors": 0, "num_step_errors": 0}
        # Batched-forward failures in a row (reset by a good step); AsyncEngine gives up past a limit.
        self.consecutive_step_errors = 0
        self.last_step_error: str | None = None

    # ------------------------------------------------------------------ requests
    def validate_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run (pure; safe from any thread)."""
        check_prompt(list(prompt_ids), params, self.max_model_len, self.config.vocab_size)
        capacity = self.cache.num_blocks * self.cache.block_size
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
        self._waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request in self._waiting:
            self._waiting.remove(request)
        if request in self._running:
            self._running.remove(request)
        self.cache.free(request_id)
        request.text_delta += request.state.abort()
        self._aborted.append(request)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    def stats(self) -> dict:
        return dict(num_waiting=len(self._waiting), num_running=len(self._running),
                    num_prefilling=sum(1 for r in self._running if r.pending > 1),
                    kv_blocks_used=self.cache.num_used_blocks, kv_blocks_total=self.cache.num_blocks,
                    kv_block_size=self.cache.block_size, max_num_seqs=self.max_num_seqs, **self._counters)

    # ------------------------------------------------------------------ scheduling
    def _preempt(self, request: _Request) -> None:
        self._running.remove(request)
        self.cache.free(request.request_id)
        request.num_computed = 0  # recompute prompt + output when readmitted
        bisect.insort(self._waiting, request, key=lambda r: r.arrival)
        self._counters["num_preemptions"] += 1

    def _schedule_decodes(self) -> list[_Request]:
        decodes = []
        for request in list(self._running):
            if request not in self._running or request.pending != 1:
                continue
            while not self.cache.allocate(request.request_id, request.num_computed + 1):
                victim = self._running[-1]  # newest
                self._preempt(victim)
                if victim is request:
                    break
            else:
                decodes.append(request)
        return [r for r in decodes if r in self._running]

    def _schedule_prefills(self) -> list[tuple[_Request, int]]:
        budget = self.max_prefill_tokens
        chunks = []
        for request in self._running:  # continue prompts already admitted (blocks already held)
            if budget == 0:
                break
            if request.pending > 1:
                chunk = min(request.pending, budget)
                chunks.append((request, chunk))
                budget -= chunk
        while budget > 0 and self._waiting and len(self._running) < self.max_num_seqs:
            request = self._waiting[0]
            # A small reserve of free blocks lets running decodes grow without preempting the request
            # just admitted; with nothing running the reserve is waived so a request filling the whole
            # cache still gets in.
            reserve = min(len(self._running), self._watermark)
            needed = self.cache.blocks_needed(request.request_id, len(request.tokens))
            if needed + reserve > self.cache.num_free_blocks or \
                    not self.cache.allocate(request.request_id, len(request.tokens)):
                break  # FIFO: the head waits for blocks, later requests do not overtake it
            self._waiting.pop(0)
            self._running.append(request)
            self._running.sort(key=lambda r: r.arrival)
            chunk = min(request.pending, budget)
            chunks.append((request, chunk))
            budget -= chunk
        return chunks

    # ------------------------------------------------------------------ forward passes
    def _forward(self, rows: list[tuple[_Request, int]]) -> torch.Tensor:
        """Feed ``chunk`` new tokens of each request (right-padded); logits (B, V) at each chunk's end."""
        B, T = len(rows), max(chunk for _, chunk in rows)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for row, (request, chunk) in enumerate(rows):
            start = request.num_computed
            input_ids[row, :chunk] = torch.tensor(request.token_slice(start, chunk))
            # Pad positions continue the row's positions (any valid position works: their outputs are unused).
            position_ids[row] = torch.arange(start, start + T).clamp(max=self.max_model_len - 1)
        self.cache.prepare([r.request_id for r, _ in rows], [r.num_computed for r, _ in rows], T)
        last = torch.tensor([chunk - 1 for _, chunk in rows], device=self.device)
        return last_token_logits(self.model, input_ids.to(self.device), position_ids.to(self.device), self.cache,
                                 last_index=last)

    def _finish(self, request: _Request) -> None:
        self._running.remove(request)
        self._requests.pop(request.request_id, None)
        self.cache.free(request.request_id)
        self._counters["num_finished"] += 1

    def _fail(self, request: _Request, error: BaseException | str) -> RequestOutput:
        """Finish one request with finish_reason "error"; the others keep running."""
        request.state.fail(error)
        if request in self._running:
            self._finish(request)
        else:
            self._requests.pop(request.request_id, None)
            if request in self._waiting:
                self._waiting.remove(request)
            self.cache.free(request.request_id)
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
        decodes = self._schedule_decodes()
        prefills = self._schedule_prefills()
        sampled: list[tuple[_Request, torch.Tensor]] = []
        try:
            if decodes:
                logits = self._forward([(r, 1) for r in decodes])
                for request in decodes:
                    request.num_computed += 1
                sampled.extend(zip(decodes, logits))
            if prefills:
                logits = self._forward(prefills)
                for (request, chunk), row_logits in zip(prefills, logits):
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
            for request in dict.fromkeys(decodes + [r for r, _ in prefills]):
                outputs.append(self._fail(request, f"the batched forward pass failed: {self.last_step_error}"))
            return outputs
        self.consecutive_step_errors = 0
        self._counters["num_steps"] += 1
        if sampled:
            for (request, _), result in zip(sampled, self._sample_rows(sampled)):
                if isinstance(result, Exception):
                    outputs.append(self._fail(request, result))
                    continue
                token, logprob = result
                try:  # detokenizing and stop checks of this request alone
                    request.text_delta += request.state.append(token, logprob)
                except Exception as exc:  # noqa: BLE001 - this request alone fails
                    outputs.append(self._fail(request, exc))
                    continue
                request.new_token_ids.append(token)
                self._counters["tokens_generated"] += 1
                if request.state.finished:
                    self._finish(request)
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

    @property
    def error(self) -> str | None:
        """Why the engine thread stopped for good (None while healthy)."""
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    def stats(self) -> dict:
        return {**self._stats, "running": self.is_running}

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
