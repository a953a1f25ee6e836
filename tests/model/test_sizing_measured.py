"""``model/sizing.py``'s predictions against measurements of the real model and a real training step.

* Activations: the bytes of the unique storages autograd saves during one forward + loss
  (``saved_tensor_bytes``, via ``torch.autograd.graph.saved_tensors_hooks``) EQUAL
  ``activation_bytes`` on the fused (triton) path -- GQA and MHA, SwiGLU and GELU, tied and untied
  head, checkpointing on and off, packed documents, fp32 and fp16 (combined into four runs).  On CPU the kernels run under
  the Triton interpreter (tests/conftest.py), hence the tiny dims.
* A CPU training step (DeepSpeed ZeRO-2, one rank, fp32): the peak of torch's allocations, read
  from the profiler's memory events (the CPU analogue of ``torch.cuda.max_memory_allocated``),
  is within ``CPU_TOLERANCE`` of ``TrainingMemory.peak``; its resident-set peak is reported too.
* On CUDA (the GPU runbook): ``torch.cuda.max_memory_allocated`` of a real step against the same
  prediction, within ``GPU_TOLERANCE``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tritium.model.config import ModelConfig
from tritium.model.sizing import activation_bytes, saved_tensor_bytes, training_memory
from tritium.model.transformer import Transformer

BASE = dict(num_layers=2, vocab_size=256, max_seq_len=64)  # the tiny preset, shrunk for the interpreter
B, T = 2, 16
CASES = {  # every feature at least once, in as few interpreter runs as possible
    "gqa-tied": ({}, {}),
    "mha-untied-packed": ({"num_kv_heads": 6, "tie_embeddings": False}, {"cu_seqlens": [0, 5, 16, 23, 32]}),
    "gqa-checkpointing": ({}, {"checkpointing": True}),
    "gelu-untied-fp16": ({"ffn_type": "gelu", "tie_embeddings": False}, {"dtype": torch.float16}),
}
# Kernel families whose autograd nodes must appear in the graph: proof the Triton path ran.
FUSED_NODES = ("norm", "attn", "rope", "entropy")  # (swiglu too, where the FFN is SwiGLU)


def _graph_node_names(loss: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__.lower())
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("case", list(CASES))
def test_activations_equal_saved_tensor_measurement(case, device):
    overrides, run = CASES[case]
    cfg = ModelConfig.from_name("tiny", **BASE, **overrides)
    dtype = run.get("dtype", torch.float32)
    torch.manual_seed(0)
    model = Transformer(cfg, backend="triton", gradient_checkpointing=run.get("checkpointing", False))
    model = model.to(device=device, dtype=dtype)
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    labels = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    cu_seqlens = (torch.tensor(run["cu_seqlens"], dtype=torch.int32, device=device) if "cu_seqlens" in run
                  else None)

    measured, loss = saved_tensor_bytes(model, input_ids, labels, cu_seqlens)
    predicted = activation_bytes(cfg, B, T, precision="fp16" if dtype == torch.float16 else "fp32",
                                 checkpointing=run.get("checkpointing", False),
                                 packed_documents=len(run["cu_seqlens"]) - 1 if "cu_seqlens" in run else None)
    assert measured == predicted

    names = " ".join(_graph_node_names(loss))
    missing = [node for node in FUSED_NODES + (("swiglu",) if cfg.ffn_type == "swiglu" else ()) if node not in names]
    assert not missing, f"Triton autograd nodes missing from the graph: {missing} ({names})"


def test_measurement_sees_what_a_backend_adds():
    """The measurement is not blind: the torch references save more than the fused kernels."""
    cfg = ModelConfig.from_name("tiny", **BASE)
    torch.manual_seed(0)
    model = Transformer(cfg, backend="torch")
    input_ids = torch.randint(0, cfg.vocab_size, (B, T))
    assert saved_tensor_bytes(model, input_ids, input_ids)[0] > activation_bytes(cfg, B, T, precision="fp32")
    assert not training_memory(cfg, 1, 1, "fp32", B, T, backend="torch").activations_covered


# ---------------------------------------------------------------------------- a real CPU training step
CPU_TOLERANCE = 0.05  # |measured allocation peak / predicted peak - 1|
CPU_MODEL = dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, ffn_hidden=1536, vocab_size=16000,
                 max_seq_len=64, tie_embeddings=True)  # 19.7M parameters: ~630 MB of ZeRO-2 fp32 states + temps
CPU_BATCH, CPU_SEQ = 1, 32


def _cpu_step(stage: int) -> dict:
    """Run in a fresh process: build a 1-rank DeepSpeed engine, train 3 steps, return peaks in bytes."""
    from torch.profiler import ProfilerActivity, profile

    from tritium.model.sizing import count_parameters
    from tritium.train.config import TrainConfig
    from tritium.train.engine import build_engine, init_distributed, resolve_model_config

    def status(key: str) -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

    cfg = TrainConfig(preset="tiny", model=CPU_MODEL, backend="torch", seq_len=CPU_SEQ, micro_batch=CPU_BATCH,
                      grad_accum=1, max_steps=3, zero_stage=stage, precision="fp32", out="unused",
                      progress=False, export=False)
    init_distributed(cfg)
    model_cfg = resolve_model_config(cfg)
    rss_before = status("VmRSS")
    # Every torch allocation from before the model exists, so the running sum starts at zero.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine = build_engine(cfg, model_cfg, world_size=1)
        input_ids = torch.randint(0, model_cfg.vocab_size, (CPU_BATCH, CPU_SEQ))
        for _ in range(3):
            engine.backward(engine(input_ids, labels=input_ids))
            engine.step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    predicted = training_memory(model_cfg, stage, 1, "fp32", CPU_BATCH, CPU_SEQ, backend="torch", device="cpu")
    return {"allocated_peak": peak, "rss_peak": status("VmHWM") - rss_before, "predicted": predicted.peak,
            "model_states": predicted.model_states, "parameters": count_parameters(model_cfg)}


def test_cpu_training_step_peak_matches_prediction():
    # CUDA hidden: on a GPU machine too this measures the CPU path (the gpu test measures CUDA)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, __file__, "cpu-step", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    # the model's states dominate whatever the process held before (imports, the interpreter)
    assert result["model_states"] > 400e6
    assert abs(result["allocated_peak"] / result["predicted"] - 1) <= CPU_TOLERANCE, result
    # resident memory also holds allocator slack and DeepSpeed's own buffers: never below the allocations
    assert result["rss_peak"] >= 0.9 * result["allocated_peak"], result


# ---------------------------------------------------------------------------- a real GPU training step
GPU_TOLERANCE = 0.10


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_training_step_peak_matches_prediction(tmp_path, stage):
    """``torch.cuda.max_memory_allocated`` over bf16 ZeRO steps of the ``small`` preset (124M), one rank."""
    pytest.importorskip("deepspeed")
    import gc

    from tritium.train.config import TrainConfig
    from tritium.train.engine import build_engine, init_distributed, resolve_model_config

    batch, seq = 4, 512
    cfg = TrainConfig(preset="small", backend="triton", seq_len=seq, micro_batch=batch, grad_accum=1, max_steps=3,
                      zero_stage=stage, precision="bf16", out=str(tmp_path), progress=False, export=False)
    init_distributed(cfg)
    model_cfg = resolve_model_config(cfg)
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # whatever earlier tests in this process still hold
    engine = build_engine(cfg, model_cfg, world_size=1)
    input_ids = torch.randint(0, model_cfg.vocab_size, (batch, seq), device="cuda")
    for step in range(3):
        if step == 1:  # after the first step Adam's states exist; measure the steady steps
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        engine.backward(engine(input_ids, labels=input_ids))
        engine.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - baseline
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    predicted = training_memory(model_cfg, stage, 1, "bf16", batch, seq, backend="triton").peak
    print(f"ZeRO-{stage}: max_memory_allocated {measured:,} B, predicted peak {predicted:,} B, "
          f"ratio {measured / predicted:.3f}")
    assert abs(measured / predicted - 1) <= GPU_TOLERANCE


if __name__ == "__main__" and sys.argv[1:2] == ["cpu-step"]:
    print(json.dumps(_cpu_step(int(sys.argv[2]))))
