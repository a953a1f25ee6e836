"""Tensor-parallel inference: rank 0 runs the generator or the engine, every rank runs each forward pass.

``tritium generate|serve --tensor-parallel N`` calls ``launch``: the calling process becomes rank 0 and
starts ranks 1..N-1 (``python -m tritium.serve.tensor_parallel``), or, under ``torchrun``, joins the
world torchrun made.  Every rank loads its slices of the checkpoint (``model/tensor_parallel.py``:
Megatron's column/row split, one all-reduce per block half) and keeps a KV cache for its own kv heads.

Rank 0 gets a ``TensorParallelModel``: to ``Generator`` and ``LLMEngine`` it is a model (``config`` is the
per-rank geometry, so the caches they build hold rank 0's heads), and each ``forward_hidden`` first
broadcasts the step's batch -- token ids, positions, and the cache's per-step state (lengths; block
tables for the paged cache) -- to the other ranks, which run the same forward on their own cache
(vLLM's driver/worker split).  Scheduling, sampling, detokenizing and HTTP stay on rank 0 only, so the
engine and the generator run unchanged; the LM head (replicated) runs on rank 0 only.

The control messages are small int64 CPU tensors on a gloo group (never pickles); the all-reduces run on
the default group: gloo on CPU, NCCL on CUDA (a rank waiting for work then blocks on a socket, not in a
spinning GPU collective).  ``close()`` broadcasts a stop message and waits for the ranks it started;
those ranks run in their own session (a Ctrl-C or SIGTERM reaches rank 0 only, which drains first) and
exit when rank 0 is gone if it is killed outright (they watch their parent).  CUDA graphs are off under tensor
parallelism: a graph cannot capture the control broadcast.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tritium.model.tensor_parallel import load_tensor_parallel
from tritium.net import free_port
from tritium.serve.kv_cache import ContiguousKVCache, PagedKVCache

WORKER_MODULE = "tritium.serve.tensor_parallel"
_HEADER = 8  # op, cache kind, B, T, block-table width, cache size 0, cache size 1, has positions
# A batch this small (every decode step of a few sequences) travels inside the header's message: one
# round trip per forward instead of two.  Larger ones (long prefills) follow in a second broadcast.
_INLINE = 128
_STOP, _FORWARD = 0, 1
_NO_CACHE, _CONTIGUOUS, _PAGED = 0, 1, 2
# A waiting rank blocks in a broadcast for as long as the server idles: no collective timeout in practice.
_TIMEOUT = datetime.timedelta(days=30)


class TensorParallelModel(nn.Module):
    """Rank 0's view of a tensor-parallel model: what ``Generator``/``LLMEngine`` call, broadcasting each batch.

    ``config`` is the per-rank geometry (``num_heads/tp`` heads, ...), ``full_config`` the model's.
    """

    def __init__(self, module: nn.Module, control_group, processes: list[subprocess.Popen] | None = None,
                 num_threads: int | None = None, stopping: threading.Event | None = None) -> None:
        super().__init__()
        self.module = module
        self.config = module.config
        self.full_config = module.full_config
        self.tensor_parallel = module.tensor_parallel
        self._control_group = control_group
        self._processes = processes or []
        self._saved_threads = num_threads
        self._stopping = stopping or threading.Event()
        self._closed = False
        # True from a forward's first broadcast until every rank is through its collectives: still True after
        # an interruption (Ctrl-C) or an error in between, when the other ranks wait inside a collective that
        # no later message would match.
        self._in_forward = False

    @property
    def backend(self) -> str:
        return self.module.backend

    @property
    def effective_backend(self) -> dict[str, str]:
        return self.module.effective_backend

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.module.lm_head_weight

    def forward_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, cu_seqlens=None,
                       kv_cache=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, H) of the whole model (every rank computes its part)."""
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens (packed training batches) is not supported under tensor parallelism")
        if self._closed:
            raise RuntimeError("TensorParallelModel is closed (its ranks have stopped)")
        if self._in_forward:
            raise RuntimeError("a tensor-parallel forward pass stopped half-way (see the first error): the ranks "
                               "are out of step; close() and launch again")
        self._in_forward = True
        self._broadcast_batch(input_ids, position_ids, kv_cache)
        hidden = self.module.forward_hidden(input_ids, position_ids=position_ids, kv_cache=kv_cache)
        self._in_forward = False
        return hidden

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, kv_cache=None
                ) -> torch.Tensor:
        """Logits (B, T, V)."""
        return self.module.lm_head(self.forward_hidden(input_ids, position_ids, kv_cache=kv_cache))

    def _broadcast_batch(self, input_ids, position_ids, kv_cache) -> None:
        B, T = input_ids.shape
        kind, sizes, width, parts = _NO_CACHE, (0, 0), 0, [input_ids.reshape(-1)]
        if position_ids is not None:
            parts.append(position_ids.reshape(-1))
        if isinstance(kv_cache, PagedKVCache):
            if kv_cache.block_table is None:
                raise RuntimeError("PagedKVCache.attend called before prepare()")
            kind, sizes, width = _PAGED, (kv_cache.num_blocks, kv_cache.block_size), kv_cache.block_table.shape[1]
            parts += [kv_cache.seqlens, kv_cache.block_table.reshape(-1)]
        elif isinstance(kv_cache, ContiguousKVCache):
            kind, sizes = _CONTIGUOUS, (kv_cache.batch_size, kv_cache.max_seq_len)
            parts.append(kv_cache.seqlens)
        elif kv_cache is not None:
            raise TypeError(f"tensor parallelism supports ContiguousKVCache and PagedKVCache, got {type(kv_cache)}")
        header = torch.tensor([_FORWARD, kind, B, T, width, *sizes, int(position_ids is not None)])
        payload = torch.cat([p.to("cpu", torch.long) for p in parts])
        message = torch.zeros(_HEADER + _INLINE, dtype=torch.long)
        message[:_HEADER] = header
        if payload.numel() <= _INLINE:
            message[_HEADER:_HEADER + payload.numel()] = payload
        dist.broadcast(message, src=0, group=self._control_group)
        if payload.numel() > _INLINE:
            dist.broadcast(payload, src=0, group=self._control_group)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the other ranks (they leave their loop and exit), wait for the ones we started, leave the world."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()  # the ranks are about to exit on purpose
        if self._in_forward:
            # Interrupted mid-forward: the ranks wait in a collective a stop message would not match (both
            # would hang). Stop the ranks we started; ranks torchrun started see the world go when we leave.
            for process in self._processes:
                process.terminate()
        else:
            try:
                dist.broadcast(torch.zeros(_HEADER + _INLINE, dtype=torch.long), src=0, group=self._control_group)
            except Exception as exc:  # noqa: BLE001 - a rank already gone: still reap and leave
                print(f"tritium: tensor parallel: could not reach every rank to stop it: {exc}", file=sys.stderr)
        for process in self._processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)


def serve_forward_calls(model: nn.Module, control_group, device: torch.device) -> None:
    """A rank > 0: run every forward pass rank 0 broadcasts, on this rank's own caches, until told to stop."""
    caches: dict[int, ContiguousKVCache | PagedKVCache] = {}
    message = torch.empty(_HEADER + _INLINE, dtype=torch.long)
    with torch.inference_mode():
        while True:
            dist.broadcast(message, src=0, group=control_group)
            op, kind, B, T, width, size0, size1, has_positions = message[:_HEADER].tolist()
            if op == _STOP:
                return
            count = B * T * (1 + has_positions) + (B if kind != _NO_CACHE else 0) + B * width
            if count <= _INLINE:
                payload = message[_HEADER:_HEADER + count].clone()
            else:
                payload = torch.empty(count, dtype=torch.long)
                dist.broadcast(payload, src=0, group=control_group)
            input_ids, rest = payload[:B * T].view(B, T), payload[B * T:]
            position_ids = None
            if has_positions:
                position_ids, rest = rest[:B * T].view(B, T).to(device), rest[B * T:]
            cache = None
            if kind != _NO_CACHE:
                cache = caches.get(kind)
                sizes = ((cache.batch_size, cache.max_seq_len) if kind == _CONTIGUOUS
                         else (cache.num_blocks, cache.block_size)) if cache is not None else None
                if sizes != (size0, size1):  # rank 0 made a new cache: make ours (same sizes, our heads)
                    caches.pop(kind, None)
                    cache = caches[kind] = (ContiguousKVCache.for_model(model, size0, size1) if kind == _CONTIGUOUS
                                            else PagedKVCache.for_model(model, size0, size1))
                seqlens = rest[:B].to(device=device, dtype=torch.int32)
                if kind == _CONTIGUOUS:
                    cache.seqlens.copy_(seqlens)
                else:
                    cache.seqlens, cache.block_table = seqlens, rest[B:].view(B, width).to(device, torch.int32)
            try:
                model.forward_hidden(input_ids.to(device), position_ids=position_ids, kv_cache=cache)
            except Exception:  # noqa: BLE001 - a bad batch fails on rank 0 too (it reports it); keep serving
                traceback.print_exc()


# ---------------------------------------------------------------------------- launching
def resolve_device(device: str, rank: int) -> torch.device:
    """``auto``/``cuda``/``cuda:N`` -> this rank's GPU (cuda:LOCAL_RANK); ``cpu`` -> cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here; use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise ValueError(f"tensor_parallel rank {rank} needs cuda:{local}, but {torch.cuda.device_count()} "
                             f"GPU(s) are visible")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def _init_world(rank: int, world_size: int, init_method: str, device: torch.device):
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=_TIMEOUT)
    # Control messages on a CPU group: a waiting rank sleeps in a socket read instead of a GPU collective.
    control = dist.new_group(backend="gloo", timeout=_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return dist.group.WORLD, control


def _cpu_threads(tensor_parallel: int, device: torch.device) -> int | None:
    """On CPU, split the cores between the ranks (N ranks x all cores each would thrash); returns the old count."""
    if device.type != "cpu":
        return None
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tensor_parallel))
    return previous


def launch(checkpoint: str | Path, tensor_parallel: int, *, device: str = "auto", dtype: str = "auto",
           backend: str | None = None, verify: bool | None = None) -> TensorParallelModel:
    """Start (or join, under torchrun) ``tensor_parallel`` ranks over ``checkpoint``; rank 0's model.

    Called in the process that becomes rank 0, which starts ranks 1..N-1 itself.  Under ``torchrun
    --nproc_per_node N`` (RANK/WORLD_SIZE set) every rank calls it: ranks > 0 serve forward passes until
    rank 0 closes, then exit.  ``close()`` the returned model when done (also run at interpreter exit).
    """
    from tritium.model.checkpoint import read_config
    from tritium.model.sizing import check_tensor_parallel

    check_tensor_parallel(read_config(checkpoint), tensor_parallel)  # fail before anything starts
    if dist.is_initialized():
        raise RuntimeError(f"torch.distributed is already initialised in this process (world size "
                           f"{dist.get_world_size()}); tensor parallelism starts its own world: call "
                           f"torch.distributed.destroy_process_group() first")
    # A launcher's world (torchrun) has RANK/WORLD_SIZE > 1; a 1-rank world a single process made for itself
    # (tritium train's in-process DeepSpeed) leaves WORLD_SIZE=1 behind, which is no world to join.
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ["WORLD_SIZE"]) != tensor_parallel:
            raise ValueError(f"tensor_parallel={tensor_parallel} but the launcher started WORLD_SIZE="
                             f"{os.environ['WORLD_SIZE']} ranks")
        rank = int(os.environ["RANK"])
        if rank != 0:
            # torchrun passes a SIGTERM (or the terminal's Ctrl-C) to every rank at once: dying here would cut
            # rank 0's drain short (its forward passes need us). Rank 0 stops us once it has drained; if it dies,
            # our next collective fails and we exit (torchrun SIGKILLs what is left after its own timeout).
            _ignore_shutdown_signals()
            run_worker(checkpoint, rank, tensor_parallel, "env://", device, dtype, backend, verify)
            raise SystemExit(0)
        init_method, processes = "env://", []
    else:
        rank, init_method = 0, f"tcp://127.0.0.1:{free_port()}"
        processes = [_start_worker(checkpoint, r, tensor_parallel, init_method, device, dtype, backend, verify)
                     for r in range(1, tensor_parallel)]
    stopping = threading.Event()
    if processes:
        threading.Thread(target=_watch, args=(processes, stopping), name="tritium-tp-watch", daemon=True).start()
    try:
        torch_device = resolve_device(device, 0)
        group, control = _init_world(0, tensor_parallel, init_method, torch_device)
        threads = _cpu_threads(tensor_parallel, torch_device)
        module = load_tensor_parallel(checkpoint, 0, tensor_parallel, group=group, control_group=control,
                                      dtype=_dtype(dtype, torch_device), device=torch_device, backend=backend,
                                      verify=verify)
    except BaseException:
        stopping.set()
        for process in processes:  # they may wait for a rendezvous that will never come
            process.kill()
            process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    model = TensorParallelModel(module, control, processes, threads, stopping).eval()
    atexit.register(model.close)
    return model


def _ignore_shutdown_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _watch(processes: list[subprocess.Popen], stopping: threading.Event, poll_s: float = 0.5) -> None:
    """Rank 0 would wait forever for a rank that died (at the rendezvous, or inside a collective): exit instead."""
    while not stopping.wait(poll_s):
        for rank, process in enumerate(processes, 1):
            code = process.poll()
            if code is not None and not stopping.is_set():
                print(f"tritium: tensor parallel: rank {rank} exited with status {code} (its error is above); "
                      f"stopping rank 0 too", file=sys.stderr, flush=True)
                time.sleep(0.5)  # let rank 0's own error, if any, be raised and printed first
                if not stopping.is_set():
                    os._exit(1)


def _dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _start_worker(checkpoint, rank, tensor_parallel, init_method, device, dtype, backend, verify) -> subprocess.Popen:
    command = [sys.executable, "-m", WORKER_MODULE, "--checkpoint", str(checkpoint), "--rank", str(rank),
               "--tensor-parallel", str(tensor_parallel), "--init-method", init_method, "--device", device,
               "--dtype", dtype, "--parent-pid", str(os.getpid())]
    if backend is not None:
        command += ["--backend", backend]
    if verify is False:
        command.append("--no-verify-checksums")
    env = {**os.environ, "LOCAL_RANK": str(rank)}
    # Own session: a terminal's Ctrl-C or a supervisor's SIGTERM reaches rank 0, which drains, then stops us.
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=2)


def run_worker(checkpoint, rank: int, tensor_parallel: int, init_method: str, device: str = "auto",
               dtype: str = "auto", backend: str | None = None, verify: bool | None = None) -> None:
    """A rank > 0 from start to finish: join, load its slices, serve forward passes, leave."""
    torch_device = resolve_device(device, rank)
    group, control = _init_world(rank, tensor_parallel, init_method, torch_device)
    try:
        _cpu_threads(tensor_parallel, torch_device)
        model = load_tensor_parallel(checkpoint, rank, tensor_parallel, group=group, control_group=control,
                                     dtype=_dtype(dtype, torch_device), device=torch_device, backend=backend,
                                     verify=verify)
        serve_forward_calls(model, control, torch_device)
    finally:
        dist.destroy_process_group()


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritium.serve.tensor_parallel",
                                     description="one rank > 0 of a tensor-parallel model (started by rank 0)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--tensor-parallel", type=int, required=True)
    parser.add_argument("--init-method", required=True, help="torch.distributed init_method, e.g. tcp://host:port")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--no-verify-checksums", dest="verify", action="store_false", default=None)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (rank 0) is gone")
    args = parser.parse_args(argv)
    # A signal meant for the server is rank 0's to handle (it drains, then stops us); if rank 0 is killed
    # outright, nobody will ever send the stop message, so we leave on our own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), name="tritium-tp-parent",
                         daemon=True).start()
    try:
        run_worker(args.checkpoint, args.rank, args.tensor_parallel, args.init_method, args.device, args.dtype,
                   args.backend, args.verify)
    except Exception as exc:  # noqa: BLE001 - one line to the log; rank 0 reports its own copy of the error
        print(f"tritium tensor-parallel rank {args.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
