"""Tensor-parallel inference on 2 CPU ranks (gloo): the same logits and greedy tokens as one process.

The pytest process is rank 0 (``launch`` starts rank 1), so the generator and the engine run here
unchanged on rank 0's ``TensorParallelModel``; ``tritium generate``/``serve --tensor-parallel 2`` run as
subprocesses.  Models are the session's tiny random ones, saved to tmp_path.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tritium.model.config import ModelConfig
from tritium.model.sizing import check_tensor_parallel
from tritium.model.tensor_parallel import local_config, shard_spec
from tritium.model.transformer import Transformer
from tritium.net import free_port
from tritium.serve.engine import LLMEngine
from tritium.serve.generator import Generator
from tritium.serve.sampling import SamplingParams

# KV-cache attention on the Triton decode kernel (interpreter on CPU) on every rank; the rest on PyTorch.
BACKEND = "torch,attention=triton"
MAX_TOKENS = (10, 4, 8, 6, 9)


def _save(model, tokenizer_dir, directory):
    model.save_pretrained(directory)
    shutil.copy(tokenizer_dir / "tokenizer.model", directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def reference(serve_model):
    """serve_model (4 heads, 2 kv heads, tied embeddings) on the backend the ranks use."""
    model = Transformer(serve_model.config, backend=BACKEND)
    model.load_state_dict(serve_model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(serve_model, tiny_tokenizer_dir, tmp_path_factory):
    return _save(serve_model, tiny_tokenizer_dir, tmp_path_factory.mktemp("tp") / "ckpt")


@pytest.fixture(scope="module")
def tp_model(checkpoint):
    import torch.distributed as dist

    from tritium.serve.tensor_parallel import launch

    if dist.is_initialized():  # a 1-rank world an in-process training test left behind
        dist.destroy_process_group()
    model = launch(checkpoint, 2, device="cpu", dtype="float32", backend=BACKEND)
    yield model
    model.close()
    assert all(p.poll() == 0 for p in model._processes)  # rank 1 left its loop and exited cleanly


@pytest.fixture(scope="module")
def requests(tiny_tokenizer, serve_prompts):
    prompts = [tiny_tokenizer.encode(p, bos=True) for p in serve_prompts + ["for i in range(10):\n    print(i)"]]
    return [(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for i, (ids, n) in enumerate(zip(prompts, MAX_TOKENS))]


# ----------------------------------------------------------------------------- layout (no processes)
def test_indivisible_head_counts_give_one_line_errors():
    cfg = ModelConfig(hidden_size=96, num_layers=1, num_heads=6, num_kv_heads=3, head_dim=16, ffn_hidden=96,
                      vocab_size=32, max_seq_len=16)
    with pytest.raises(ValueError, match=r"tensor_parallel=4 does not divide num_attention_heads=6") as exc:
        check_tensor_parallel(cfg, 4)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"tensor_parallel=2 and num_key_value_heads=3"):
        check_tensor_parallel(cfg, 2)
    check_tensor_parallel(cfg, 3)
    check_tensor_parallel(cfg, 6)  # 3 kv heads, each replicated on 2 ranks
    local = local_config(cfg, 6)
    assert (local.num_heads, local.num_kv_heads, local.head_dim, local.ffn_hidden) == (1, 1, 16, 16)


def test_cli_rejects_an_indivisible_degree(checkpoint, capsys):
    from tritium.cli import main

    code = main(["generate", "--checkpoint", str(checkpoint), "--tensor-parallel", "3", "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "tensor_parallel=3 does not divide num_attention_heads=4" in err and "\n" not in err


def test_cli_under_a_launcher_needs_the_degree(checkpoint, capsys, monkeypatch):
    """`torchrun --nproc_per_node 2 -m tritium generate ...` without --tensor-parallel ran two whole copies."""
    from tritium.cli import main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["generate", "--checkpoint", str(checkpoint), "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "WORLD_SIZE=2: pass --tensor-parallel 2" in err and "\n" not in err


def test_replicated_kv_heads_follow_their_query_groups():
    # 8 query heads, 2 kv heads (groups of 4), 4 ranks of 2 query heads: ranks 0-1 read kv head 0, 2-3 kv head 1.
    cfg = ModelConfig(hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=8, ffn_hidden=32,
                      vocab_size=32, max_seq_len=16)
    kv = [shard_spec("layers.0.self_attn.k_proj.weight", cfg, r, 4) for r in range(4)]
    assert kv == [(0, 0, 8), (0, 0, 8), (0, 8, 16), (0, 8, 16)]
    assert shard_spec("layers.0.self_attn.o_proj.weight", cfg, 3, 4) == (1, 48, 64)
    assert shard_spec("layers.0.mlp.down_proj.weight", cfg, 1, 4) == (1, 8, 16)
    assert shard_spec("embed_tokens.weight", cfg, 1, 4) is None


def test_each_rank_reads_only_its_slices(serve_model, tmp_path, monkeypatch):
    """Rank 1 of 2 from a sharded checkpoint (no process group needed to load): its slices, never a whole
    sharded tensor; a corrupt file is refused as by load_pretrained."""
    import safetensors

    from tritium.model.checkpoint import CheckpointError
    from tritium.model.tensor_parallel import load_tensor_parallel, shard_state_dict

    ckpt = serve_model.save_pretrained(tmp_path / "sharded", max_shard_size=40_000)
    assert (ckpt / "model.safetensors.index.json").is_file()
    whole_reads = []
    real_open = safetensors.safe_open

    class Spy:  # records get_tensor (whole tensors); the loader must only use get_slice
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr("tritium.model.tensor_parallel.safe_open", Spy)
    rank1 = load_tensor_parallel(ckpt, 1, 2, backend="torch")
    assert whole_reads == []
    expected = shard_state_dict(serve_model.state_dict(), serve_model.config, 1, 2)
    got = rank1.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert got["layers.1.mlp.down_proj.weight"].shape == (64, 64)  # (hidden, ffn_hidden / 2)
    assert rank1.lm_head_weight is rank1.embed_tokens.weight  # tied, replicated

    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        load_tensor_parallel(ckpt, 1, 2)


# ----------------------------------------------------------------------------- 2 ranks
def test_logits_equal_one_process(tp_model, reference, monkeypatch):
    from tritium.serve import tensor_parallel

    sizes = []  # of rank 0's control broadcasts: a small batch rides in one message, a larger needs a second
    broadcast = tensor_parallel.dist.broadcast
    monkeypatch.setattr(tensor_parallel.dist, "broadcast", lambda t, *a, **k: sizes.append(t.numel()) or
                        broadcast(t, *a, **k))
    assert tp_model.config.num_heads == 2 and tp_model.config.num_kv_heads == 1  # rank 0 holds half the heads
    local_q = tp_model.module.layers[0].self_attn.q_proj.weight
    assert local_q.shape == (32, 64) and torch.equal(local_q, reference.layers[0].self_attn.q_proj.weight[:32])
    for shape in ((2, 11), (2, 70)):
        ids = torch.randint(0, reference.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected, got = reference(ids), tp_model(ids)
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    message = tensor_parallel._HEADER + tensor_parallel._INLINE
    assert sizes == [message, message, 140]


def test_generator_greedy_equals_one_process(tp_model, reference, tiny_tokenizer, serve_prompts, decode_launches):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = Generator(reference, tiny_tokenizer, compile=False).generate(serve_prompts[:3], params)
    launches = decode_launches.launches
    generator = Generator(tp_model, tiny_tokenizer, compile=False)
    got = generator.generate(serve_prompts[:3], params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert generator._cache.k[0].shape[2] == 1  # rank 0's cache holds its 1 of the 2 kv heads
    assert decode_launches.launches - launches >= 8 * tp_model.config.num_layers  # the Triton decode kernel ran


def test_engine_greedy_equals_one_process_with_chunks_and_preemption(tp_model, reference, tiny_tokenizer,
                                                                     requests):
    def run(model):
        # 16 blocks x 4 tokens for ~100 tokens of work: queueing and preemption; 16-token prefill chunks.
        engine = LLMEngine(model, tiny_tokenizer, block_size=4, num_blocks=16, max_num_seqs=5, max_prefill_tokens=16)
        for request in requests:
            engine.add_request(*request)
        final = engine.run_to_completion()
        return {rid: out.token_ids for rid, out in final.items()}, engine.stats()

    assert max(len(ids) for _, ids, _ in requests) > 16  # the longest prompt is prefilled in chunks
    expected, _ = run(reference)
    got, stats = run(tp_model)
    assert got == expected
    assert stats["num_preemptions"] > 0 and stats["kv_blocks_used"] == 0
    assert stats["prompt_tokens_processed"] > sum(len(ids) for _, ids, _ in requests)  # recomputed after preemption


# ----------------------------------------------------------------------------- the commands
def test_generate_command_replicates_a_single_kv_head(serve_model, tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    """`tritium generate --tensor-parallel 2` on a model with 1 kv head (replicated on both ranks)."""
    cfg = ModelConfig(**{**serve_model.config.to_dict(), "num_kv_heads": 1})
    torch.manual_seed(7)
    model = Transformer(cfg, backend="torch").eval()
    ckpt = _save(model, tiny_tokenizer_dir, tmp_path / "kv1")
    prompt = "def main():"
    expected = Generator(model, tiny_tokenizer, compile=False).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].text
    result = subprocess.run([sys.executable, "-m", "tritium", "generate", "--checkpoint", str(ckpt), "--device", "cpu",
                             "--tensor-parallel", "2", "--greedy", "--ignore-eos", "--max-tokens", "12", "--stats",
                             prompt], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "12 completion tokens" in result.stderr


def _wait_until_healthy(process: subprocess.Popen, port: int, timeout_s: float = 90) -> None:
    """Poll /health until 200; fail with the process's stderr if it exits first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.3)


def test_serve_command_answers_openai_client_and_all_ranks_exit(checkpoint, serve_model, tiny_tokenizer):
    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tritium", "serve", "--checkpoint", str(checkpoint),
                               "--port", str(port), "--device", "cpu", "--backend", "torch", "--tensor-parallel", "2",
                               "--num-blocks", "16", "--block-size", "4", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_healthy(server, port)
        ranks = psutil.Process(server.pid).children(recursive=True)
        assert len(ranks) == 1  # rank 1

        prompt = "import os"
        expected = Generator(serve_model, tiny_tokenizer, compile=False).generate(
            [prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].text
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        done = oai.completions.create(model="tritium", prompt=prompt, max_tokens=6, temperature=0)
        assert done.choices[0].text == expected
        stream = oai.completions.create(model="tritium", prompt=prompt, max_tokens=6, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
        chat = oai.chat.completions.create(model="tritium", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, stream=True)
        assert sum(1 for _ in chat) >= 1

        server.send_signal(signal.SIGTERM)  # drains, stops the engine, then rank 1 (close waits for it)
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        psutil.wait_procs(ranks, timeout=30)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    finally:
        if server.poll() is None:
            server.kill()
        out = server.communicate()
        if server.returncode not in (0, None):
            print(json.dumps(out[1][-2000:]))


def test_a_rank_exits_when_rank_0_is_killed_outright(checkpoint):
    """SIGKILL leaves rank 0 no chance to send the stop message: rank 1 notices its parent is gone and exits."""
    port = free_port()
    shell = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -m tritium.serve.tensor_parallel --checkpoint '
                              f'"{checkpoint}" --rank 1 --tensor-parallel 2 --init-method tcp://127.0.0.1:{port} '
                              f'--device cpu --parent-pid $$ & wait'])
    deadline = time.monotonic() + 30
    while not psutil.Process(shell.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    (rank1,) = psutil.Process(shell.pid).children()
    time.sleep(1)
    assert rank1.is_running()  # waiting at the rendezvous for a rank 0 that never comes
    shell.kill()
    shell.wait()
    rank1.wait(timeout=60)  # psutil.TimeoutExpired if it outlives its parent
    assert not rank1.is_running()


def test_torchrun_sigterm_drains_in_flight_requests_then_every_rank_exits(checkpoint):
    """torchrun sends SIGTERM to every rank at once; rank 1 must outlive rank 0's drain (it runs half of every
    forward pass), so a stream in flight still ends with all its tokens and [DONE], then nothing is left."""
    import httpx

    port, max_tokens = free_port(), 40
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "tritium", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
                                 "--device", "cpu", "--backend", "torch", "--tensor-parallel", "2", "--num-blocks",
                                 "16", "--block-size", "4", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_healthy(launcher, port)
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert len(ranks) == 2
        body = {"prompt": "import os", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:
                    launcher.send_signal(signal.SIGTERM)  # mid-stream: the first chunk is out
                lines.append(line)
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == max_tokens
        launcher.wait(60)
        psutil.wait_procs(ranks, timeout=30)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    finally:
        if launcher.poll() is None:
            for p in psutil.Process(launcher.pid).children(recursive=True):
                p.kill()
            launcher.kill()
        launcher.communicate()


_INTERRUPT_SCRIPT = """
import sys, time, torch
from tritium.serve.tensor_parallel import launch
model = launch(sys.argv[1], 2, device="cpu", dtype="float32", backend="torch")
ids = torch.tensor([[1, 2, 3]])
model(ids)  # one whole forward: the ranks are in step
def interrupted(*args, **kwargs):  # Ctrl-C after the batch went out, before rank 0's all-reduces
    raise KeyboardInterrupt
model.module.forward_hidden = interrupted
try:
    model(ids)
except KeyboardInterrupt:
    pass
try:
    model(ids)
except RuntimeError as exc:
    print("refused:", exc)
start = time.monotonic()
model.close(timeout=20)
print("closed", round(time.monotonic() - start, 1), [p.poll() for p in model._processes])
"""


def test_close_after_an_interrupted_forward_stops_the_ranks_instead_of_hanging(checkpoint):
    """Ctrl-C mid-forward leaves rank 1 inside an all-reduce: a stop broadcast would not match it and both ranks
    would wait forever (seen with `tritium generate --tensor-parallel 2` + Ctrl-C). close() must still return."""
    done = subprocess.run([sys.executable, "-c", _INTERRUPT_SCRIPT, str(checkpoint)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: a tensor-parallel forward pass stopped half-way" in done.stdout  # no second, mismatched forward
    closed = done.stdout.splitlines()[-1].split()
    assert closed[0] == "closed" and float(closed[1]) < 20 and closed[2] != "[None]"  # rank 1 ended, not waited out
