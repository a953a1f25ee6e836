"""The one training loop: forward, loss, backward, optimizer step -- for pretraining, SFT and DPO alike.

``run(engine, batches, objective, cfg=...)`` knows nothing about objectives beyond the ``Objective``
contract below, and ``batches(start)`` supplies the micro-batches of this rank.  DeepSpeed owns the
numerics of a step -- when the optimizer steps (the accumulation boundary), loss scaling, clipping,
ZeRO partitioning, the lr schedule; the loop owns how a step's loss is normalised.  Around that it
does what every run needs: metrics averaged over ranks and micro-batches, tokens/s and MFU,
validation, periodic and on-signal checkpoints, a progress bar with ETA on rank 0.

The objective contract (``Objective``; any object with these two methods works)::

    objective.count(batch) -> int | float | 0-dim tensor   # items the loss sums over (targets, pairs)
    objective.loss(model, batch) -> (sum_loss, metrics)     # SUM of per-item losses (0-dim, with grad)

The loss of one optimizer step is the sum of the per-item losses over every micro-batch of the step
on every rank, divided by the number of items of the whole step (Hugging Face's
``num_items_in_batch``, torchtitan's global token count).  So the loop first takes the step's
``grad_accum`` micro-batches, counts their items with ``count`` (no forward), all-reduces the count
over the data-parallel ranks, and then runs forward/backward on each micro-batch with
``sum_loss * dp_world / global_count``: ``engine.backward(..., scale_wrt_gas=False)`` skips
DeepSpeed's own division by ``grad_accum``, and the ``dp_world`` factor undoes its averaging of
gradients over ranks.  The gradient therefore never depends on how the step's examples are split
into micro-batches and ranks, even when their item counts differ (3 vs 24 completion tokens).  The
logged ``loss`` is the same global mean (averaged over the optimizer steps of a log window).  A
plain callable ``(model, batch) -> (loss, metrics)`` is still accepted and counts as one item per
micro-batch (the mean of micro-batch means): right only for objectives that are per-micro-batch
means by design.

Stopping on SIGTERM/SIGINT: the handler only raises a flag; the ranks agree
on it with one all-reduce per optimizer step, so every rank checkpoints the
same step and exits together (a rank stopping alone would hang the others
in their next collective).
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritium.train.checkpoints import Checkpointer, WriteError, agree_on_writes, rng_state
from tritium.train.config import TrainConfig
from tritium.train.metrics import (
    MetricsWriter,
    device_peak_flops,
    memory_stats,
    model_flops_utilization,
    read_metrics,
)

LossFn = Callable[[Any, Mapping[str, Any]], "tuple[torch.Tensor, Mapping[str, Any]]"]
BatchSource = Callable[[int], Iterable[Mapping[str, Any]]]
IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch's and Hugging Face's convention)


@dataclass(frozen=True)
class Objective:
    """What the loop minimises, split so a step's loss can be normalised over the whole step.

    loss(model, batch) -> (sum_loss, metrics): the SUM of this micro-batch's per-item losses (a 0-dim
        tensor with grad; per-token NLLs, per-pair preference losses, ...); metrics are floats or tensors,
        averaged over micro-batches and ranks when logged; ``num_tokens`` (optional) feeds tokens/s.
    count(batch) -> int | float | 0-dim tensor: how many items ``sum_loss`` sums over, from the batch
        alone -- the loop calls it for every micro-batch of a step before the first forward.
    """

    loss: Callable[[Any, Mapping[str, Any]], tuple[torch.Tensor, Mapping[str, Any]]]
    count: Callable[[Mapping[str, Any]], Any]
    name: str = ""  # for messages

    def mean(self, model, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Mapping[str, Any]]:
        """This micro-batch's mean loss (``sum_loss / count``, 0 when it has no items) and its metrics."""
        total, metrics = self.loss(model, batch)
        return total / max(_as_float(self.count(batch)), 1.0), metrics


def count_targets(batch: Mapping[str, Any]) -> int:
    """Positions of ``batch["labels"]`` that carry a loss (label != -100): the count of token-level NLLs."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def _one_per_micro_batch(batch: Mapping[str, Any]) -> int:
    return 1


def as_objective(loss_fn: Objective | LossFn) -> Objective:
    """``loss_fn`` as an ``Objective``; a plain ``(model, batch) -> (loss, metrics)`` counts one item per micro-batch."""
    if isinstance(loss_fn, Objective):
        return loss_fn
    if callable(getattr(loss_fn, "loss", None)) and callable(getattr(loss_fn, "count", None)):
        return Objective(loss=loss_fn.loss, count=loss_fn.count, name=getattr(loss_fn, "name", ""))
    if callable(loss_fn):
        return Objective(loss=loss_fn, count=_one_per_micro_batch, name=getattr(loss_fn, "__name__", ""))
    raise TypeError(f"loss_fn must be an Objective (loss + count) or a callable, got {type(loss_fn).__name__}")


@dataclass
class LoopState:
    """Where a run is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps completed
    micro_step: int = 0  # micro-batches this rank has consumed (the data position)
    tokens: int = 0  # tokens processed over all ranks
    best_val_loss: float | None = None  # lowest validation loss so far

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "micro_step": self.micro_step, "tokens": self.tokens,
                "best_val_loss": self.best_val_loss}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopState:
        return cls(step=int(data.get("step", 0)), micro_step=int(data.get("micro_step", 0)),
                   tokens=int(data.get("tokens", 0)), best_val_loss=data.get("best_val_loss"))


@dataclass
class LoopResult:
    state: LoopState  # where the loop stopped
    history: list[dict[str, Any]] = field(default_factory=list)  # the logged records (rank 0; [] elsewhere)
    interrupted: bool = False  # stopped by SIGTERM/SIGINT (a checkpoint was saved)
    last_checkpoint: Path | None = None  # newest checkpoint written by this loop

    @property
    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.history if r.get("loss") is not None]
        return losses[-1] if losses else None


class _StopFlag:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().double().mean().item())
    return float(value)


class _MicroBatches:
    """Endless micro-batches from ``source(start)``; restarts the source at the current position when it ends."""

    def __init__(self, source: BatchSource | Iterable, start: int):
        self.source = source
        self.position = start
        self._iterator: Iterator | None = None
        self._opened = False

    def _open(self) -> Iterator:
        if callable(self.source):
            return iter(self.source(self.position))
        if self.position and not self._opened:
            raise ValueError("resuming needs batches as a callable start -> iterator (the data position)")
        self._opened = True
        return iter(self.source)  # a re-iterable (list) starts a new epoch; a spent iterator ends the run

    def next(self) -> Mapping[str, Any]:
        for attempt in range(2):
            if self._iterator is None:
                self._iterator = self._open()
            try:
                batch = next(self._iterator)
                self.position += 1
                return batch
            except StopIteration:
                self._iterator = None
        raise ValueError(f"the batch source yields no batches (at position {self.position})")


def evaluate(engine, make_eval_batches: Callable[[], Iterable[Mapping[str, Any]]], loss_fn: Objective | LossFn,
             max_batches: int) -> dict[str, float]:
    """Validation loss = summed loss over every batch and rank / their summed count (same rule as training)."""
    objective = as_objective(loss_fn)
    dist = _dist()
    batches = []
    for batch in make_eval_batches():
        batches.append(batch)
        if len(batches) >= max_batches:
            break
    count = torch.tensor([len(batches)], dtype=torch.long)
    if dist is not None:  # ZeRO-3 forwards are collective: every rank must run the same number
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    was_training = engine.training
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches[: int(count.item())]:
            items = _as_float(objective.count(batch))
            batch = _to_device(batch, engine.device)
            total, _ = objective.loss(engine, batch)
            totals += torch.tensor([_as_float(total), items], dtype=torch.float64)
    if was_training:
        engine.train()
    if dist is not None:
        dist.all_reduce(totals)
    if totals[1] <= 0:
        return {}
    val_loss = float(totals[0] / totals[1])
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def _count_tokens(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def run(engine, batches: BatchSource | Iterable[Mapping[str, Any]], loss_fn: Objective | LossFn, *,
        cfg: TrainConfig, run_dir: str | Path | None = None, state: LoopState | Mapping[str, Any] | None = None,
        checkpointer: Checkpointer | None = None, make_eval_batches: Callable[[], Iterable] | None = None,
        eval_loss_fn: Objective | LossFn | None = None, flops_per_token: float | None = None,
        client_state: Callable[[], dict[str, Any]] | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None) -> LoopResult:
    """Train ``engine`` until ``cfg.max_steps`` optimizer steps (or a stop signal).

    batches: ``start -> iterator`` of this rank's micro-batches beginning at micro-batch ``start``
        (how a resumed run continues the data), or a plain iterable when never resuming.
    loss_fn: the ``Objective`` (``count(batch)`` and ``loss(model, batch) -> (sum_loss, metrics)``, see the
        module docstring); ``model`` is the engine, batch tensors are on its device.  A plain callable
        ``(model, batch) -> (loss, metrics)`` counts as one item per micro-batch.
    state: where to start (``LoopState`` or the dict a checkpoint returned); default: step 0.
    checkpointer: saves every ``cfg.save_interval`` steps, at the end, and on SIGTERM/SIGINT.
    make_eval_batches: fresh finite iterable of validation micro-batches (every ``cfg.eval_interval`` steps).
    eval_loss_fn: the validation objective (default: ``loss_fn``).
    flops_per_token: model FLOPs per trained token, for MFU (``tritium.model.sizing.flops_per_token``).
    client_state: extra JSON-able state to store in each checkpoint (e.g. tokenizer fingerprint).
    on_log: called on rank 0 with every logged record.
    """
    objective = as_objective(loss_fn)
    dist = _dist()
    rank = dist.get_rank() if dist is not None else 0
    world = dist.get_world_size() if dist is not None else 1
    # DeepSpeed averages gradients over the data-parallel group: multiplying by its size makes that a sum
    dp_world = int(getattr(engine, "dp_world_size", world) or world)
    is_main = rank == 0
    state = state if isinstance(state, LoopState) else LoopState.from_dict(state or {})
    grad_accum = engine.gradient_accumulation_steps()
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    peak, peak_source = device_peak_flops(precision, cfg.peak_flops)
    opened: WriteError | None = None
    try:
        writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard, enabled=is_main)
    except WriteError as exc:
        writer, opened = MetricsWriter(None, enabled=False), exc
    agree_on_writes(opened, "metrics log")  # a full disk stops every rank together, before the first step
    history: list[dict[str, Any]] = []
    source = _MicroBatches(batches, state.micro_step)
    eval_objective = as_objective(eval_loss_fn) if eval_loss_fn is not None else objective
    last_checkpoint: Path | None = None
    saved_step = -1

    def save() -> Path | None:
        nonlocal last_checkpoint, saved_step
        if checkpointer is None or saved_step == state.step:
            return None
        extra = client_state() if client_state is not None else {}
        last_checkpoint = checkpointer.save(engine, state.step, {"loop": state.to_dict(), **extra},
                                            {"rng": rng_state(), "micro_step": state.micro_step})
        saved_step = state.step
        return last_checkpoint

    bar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.5, file=sys.stderr)

    interrupted = False
    # ZeRO-0 in fp32 hands grads straight to the torch optimizer and keeps no norm: measure it ourselves
    plain_grads = not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
    last_grad_norm: float | None = None
    # running sums since the last log line: metric sums over micro-batches; this rank's share of each
    # step's global mean loss (summed over ranks at log time), and the steps that had items
    sums: dict[str, float] = {}
    count = 0
    loss_share = 0.0
    loss_steps = 0
    tokens_since = 0
    window_start = time.perf_counter()
    engine.train()
    try:
        with _StopFlag() as stop:
            while state.step < cfg.max_steps:
                # ---- one optimizer step = grad_accum micro-batches (DeepSpeed steps on the boundary)
                lrs = engine.get_lr()  # the lr this step uses (the scheduler advances inside engine.step)
                window = [source.next() for _ in range(grad_accum)]
                step_items = _global_count(objective, window, dist)  # before any backward
                scale = dp_world / step_items if step_items > 0 else 0.0
                step_sum = 0.0
                for batch in window:
                    batch = _to_device(batch, engine.device)
                    total, metrics = objective.loss(engine, batch)  # 1. forward  2. summed loss
                    # 3. backward of this micro-batch's share of the step's global mean (no division by grad_accum)
                    engine.backward(total * scale, scale_wrt_gas=False)
                    if plain_grads and engine.is_gradient_accumulation_boundary():
                        last_grad_norm = _grad_norm(engine.module)
                    engine.step()  # 4. optimizer step on the accumulation boundary, lr schedule, zero_grad
                    state.micro_step += 1
                    step_sum += _as_float(total)
                    tokens = int(_as_float(metrics.get("num_tokens", _count_tokens(batch))))
                    tokens_since += tokens
                    for key, value in metrics.items():
                        if key != "num_tokens":
                            sums[key] = sums.get(key, 0.0) + _as_float(value)
                    count += 1
                if step_items > 0:
                    loss_share += step_sum / step_items
                    loss_steps += 1
                state.step += 1
                stop_now = _agree_stop(stop.signal is not None, dist)
                last = state.step >= cfg.max_steps
                if state.step % cfg.log_interval == 0 or last or stop_now:
                    record = _log_record(engine, state, sums, count, tokens_since, window_start, dist, world,
                                         flops_per_token, peak, peak_source, lrs, last_grad_norm,
                                         loss_share=loss_share, loss_steps=loss_steps)
                    state.tokens += int(record.pop("_tokens"))
                    sums, count, tokens_since, loss_share, loss_steps = {}, 0, 0, 0.0, 0
                    window_start = time.perf_counter()
                    if cfg.eval_interval and make_eval_batches is not None and (
                            state.step % cfg.eval_interval == 0 or last):
                        record.update(evaluate(engine, make_eval_batches, eval_objective, cfg.eval_steps))
                        if "val_loss" in record and (state.best_val_loss is None
                                                     or record["val_loss"] < state.best_val_loss):
                            state.best_val_loss = record["val_loss"]
                    if is_main:
                        history.append(record)
                        written = _write_record(writer, record)
                        if on_log is not None:
                            on_log(record)
                        _show(bar, record, cfg)
                    agree_on_writes(written if is_main else None, "metrics log")
                elif cfg.eval_interval and make_eval_batches is not None and state.step % cfg.eval_interval == 0:
                    record = {"step": state.step, **evaluate(engine, make_eval_batches, eval_objective,
                                                             cfg.eval_steps)}
                    if is_main:
                        history.append(record)
                        written = _write_record(writer, record)
                    agree_on_writes(written if is_main else None, "metrics log")
                if bar is not None:
                    bar.update(1)
                if stop_now:
                    save()
                    interrupted = True
                    if is_main:
                        name = signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
                        print(f"\ntritium train: stopped by {name} at step {state.step}; checkpoint saved"
                              f"{' to ' + str(last_checkpoint) if last_checkpoint else ''}", file=sys.stderr,
                              flush=True)
                    break
                if checkpointer is not None and cfg.save_interval and state.step % cfg.save_interval == 0:
                    save()
            if not interrupted:
                save()  # the end of a run is always resumable (e.g. to extend max_steps)
    finally:
        if bar is not None:
            bar.close()
        with contextlib.suppress(WriteError):  # a log that cannot be flushed was reported already
            writer.close()
    return LoopResult(state=state, history=history, interrupted=interrupted, last_checkpoint=last_checkpoint)


def _write_record(writer: MetricsWriter, record: dict[str, Any]) -> WriteError | None:
    """Append ``record`` to metrics.jsonl; a failed write is returned, so every rank can stop together."""
    try:
        writer.write(record)
    except WriteError as exc:
        return exc
    return None


def _global_count(objective: Objective, window: list[Mapping[str, Any]], dist) -> float:
    """Items of one optimizer step: summed over the accumulation window, all-reduced over ranks."""
    local = 0.0
    for batch in window:
        items = _as_float(objective.count(batch))
        if not math.isfinite(items) or items < 0:
            raise ValueError(f"objective {objective.name or ''} count(batch) must be a finite number >= 0, "
                             f"got {items}")
        local += items
    if dist is None:
        return local
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def _agree_stop(local: bool, dist) -> bool:
    if dist is None:
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _log_record(engine, state: LoopState, sums: dict[str, float], count: int, tokens: int, window_start: float,
                dist, world: int, flops_per_token: float | None, peak: float, peak_source: str,
                lrs: list[float], grad_norm_override: float | None = None, *, loss_share: float = 0.0,
                loss_steps: int = 0) -> dict[str, Any]:
    """The step loss (global mean, averaged over the window's steps), other metrics averaged over
    micro-batches and ranks; throughput over the window since the last log."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [loss_share, float(count), float(tokens)], dtype=torch.float64)
    if dist is not None:
        dist.all_reduce(values)
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    total_loss, total_count, total_tokens = values[-3].item(), values[-2].item(), values[-1].item()
    # every rank added its sum / global count: the sum over ranks is the step's global mean
    record: dict[str, Any] = {"step": state.step}
    for i, key in enumerate(keys):
        record[key] = values[i].item() / max(total_count, 1.0)
    record["loss"] = total_loss / loss_steps if loss_steps else None  # never a metric of the same name
    record["lr"] = float(lrs[0]) if lrs else None
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = grad_norm_override
    record["grad_norm"] = _as_float(grad_norm) if grad_norm is not None else None
    tokens_per_s = total_tokens / elapsed
    record["tokens_per_s"] = tokens_per_s
    record["tokens"] = state.tokens + int(total_tokens)
    record["mfu"], why = model_flops_utilization(tokens_per_s * (flops_per_token or math.nan), peak * world)
    if why:
        record["mfu_note"] = why
    record["peak_flops"] = peak if math.isfinite(peak) else None
    record["peak_flops_source"] = peak_source
    if engine.fp16_enabled():
        scaler = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
        if isinstance(scaler, (int, float)):
            record["loss_scale"] = float(scaler)
    record.update(memory_stats())
    record["elapsed_s"] = elapsed
    record["_tokens"] = total_tokens
    return record


def _show(bar, record: dict[str, Any], cfg: TrainConfig) -> None:
    parts = {"loss": f"{record['loss']:.4f}" if record.get("loss") is not None else "-",
             "lr": f"{record['lr']:.2e}" if record.get("lr") is not None else "-",
             "tok/s": f"{record['tokens_per_s']:.0f}"}
    if record.get("mfu") is not None:
        parts["mfu"] = f"{100 * record['mfu']:.1f}%"
    if record.get("val_loss") is not None:
        parts["val"] = f"{record['val_loss']:.4f}"
    if bar is not None:
        bar.set_postfix(parts, refresh=False)
    else:
        print(f"step {record['step']}/{cfg.max_steps} " + " ".join(f"{k}={v}" for k, v in parts.items()), flush=True)


__all__ = ["IGNORE_INDEX", "LoopResult", "LoopState", "Objective", "as_objective", "count_targets", "evaluate",
           "read_metrics", "run"]
