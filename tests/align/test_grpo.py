"""GRPO: the loss against hand-computed numbers, reward loading, weight sync, a 2-rank ZeRO-3 run, the CLI."""
from __future__ import annotations

import json
import math
import os
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from tritium.align.grpo import (
    GRPOConfig,
    group_advantages,
    load_reward,
    per_token_grpo_loss,
    reduce_grpo_loss,
    score_completions,
    select_groups,
)
from tritium.model.config import ModelConfig
from tritium.net import free_port

TOY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=128, vocab_size=2048,
                 max_seq_len=128, tie_embeddings=True, backend="sdpa")
# a verifiable toy task a random model can be pushed toward in a few steps: start the reply with a-m
TOY_REWARDS = textwrap.dedent('''
    def first_letter(prompt, completion, **fields):
        return 1.0 if completion.strip().lower()[:1] in set("abcdefghijklm") else 0.0

    not_callable = 3

    def no_args():
        return 1.0
''')


# ------------------------------------------------------------------------------- the loss by hand
LOGPS = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
OLD = torch.tensor([[-1.2, -1.5, 0.0], [-0.5, 0.0, 0.0]])
REF = torch.tensor([[-1.0, -1.0, 0.0], [-1.5, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
ADV = torch.tensor([1.0, -2.0])


def _hand_tokens(beta: float) -> list[float]:
    # token (0,0): ratio e^0.2 = 1.221 > 1.2 with A = +1 -> the clipped 1.2 is the min
    t00 = -min(math.exp(0.2) * 1.0, 1.2 * 1.0)
    # token (0,1): ratio e^-0.5 = 0.607 < 0.8 with A = +1 -> the unclipped ratio is the min
    t01 = -min(math.exp(-0.5), 0.8)
    t10 = -(-2.0)  # ratio 1: no clipping, -ratio * A
    kl01 = math.exp(1.0) - 1.0 - 1.0  # ref - logp = +1
    kl10 = math.exp(-1.0) + 1.0 - 1.0  # ref - logp = -1
    return [t00, t01 + beta * kl01, t10 + beta * kl10]


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_per_token_loss_clipping_and_kl_by_hand(beta):
    loss, parts = per_token_grpo_loss(LOGPS, OLD, ADV, REF, epsilon=0.2, beta=beta)
    t00, t01, t10 = _hand_tokens(beta)
    assert loss[0, 0].item() == pytest.approx(t00, abs=1e-6)
    assert loss[0, 1].item() == pytest.approx(t01, abs=1e-6)
    assert loss[1, 0].item() == pytest.approx(t10, abs=1e-6)
    assert parts["clipped"][0].tolist() == [True, False, False]
    if beta:
        assert parts["kl"][0, 1].item() == pytest.approx(math.e - 2, abs=1e-6)
        assert (parts["kl"] >= 0).all()


def test_upper_clip_is_separate():
    loss, parts = per_token_grpo_loss(LOGPS, OLD, ADV, epsilon=0.2, epsilon_high=0.28)
    assert loss[0, 0].item() == pytest.approx(-math.exp(0.2), abs=1e-6)  # 1.221 < 1.28: no longer clipped
    assert not parts["clipped"][0, 0]


def test_normalisations_by_hand():
    per_token, _ = per_token_grpo_loss(LOGPS, OLD, ADV, REF, epsilon=0.2, beta=0.1)
    t00, t01, t10 = _hand_tokens(0.1)
    expected = {"grpo": ((t00 + t01) / 2 + t10, 2.0),  # each completion's token mean, then / completions
                "dr_grpo": (t00 + t01 + t10, 2.0 * 4),  # / (completions x max_completion_tokens=4)
                "dapo": (t00 + t01 + t10, 3.0)}  # / completion tokens
    for loss_type, (total, count) in expected.items():
        got_total, got_count = reduce_grpo_loss(per_token, MASK, loss_type, max_completion_tokens=4)
        assert got_total.item() == pytest.approx(total, abs=1e-6), loss_type
        assert got_count.item() == count, loss_type
    with pytest.raises(ValueError, match="loss_type"):
        reduce_grpo_loss(per_token, MASK, "ppo", 4)


def test_gradient_pushes_up_positive_advantages():
    logps = LOGPS.clone().requires_grad_(True)
    loss, _ = per_token_grpo_loss(logps, logps.detach(), ADV)  # num_iterations = 1: ratio 1
    total, count = reduce_grpo_loss(loss, MASK, "dapo", 4)
    (total / count).backward()
    # d/dlogp of -ratio * A / 3 = -A / 3 on every completion token, 0 on padding
    assert torch.allclose(logps.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]]))


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, zero_std = group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with one reward teaches nothing
    assert zero_std == 0.5
    unscaled, _ = group_advantages(rewards, 4, scale=False)
    assert torch.allclose(unscaled[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_dynamic_sampling_keeps_groups_with_a_spread_first():
    # groups (G=2): 0 all-right, 1 mixed, 2 all-wrong, 3 mixed, 4 mixed
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    assert select_groups(rewards, 2, 2) == [1, 3]  # the first informative groups, in draw order
    assert select_groups(rewards, 2, 4) == [0, 1, 3, 4]  # all three informative ones, then the first other
    assert select_groups(torch.ones(6), 2, 2) == [0, 1]  # nothing informative: the first groups


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOConfig(rewards=("correctness",), reward_weights=(1.0, 2.0))
    assert GRPOConfig().reward_weights == (1.0, 0.1)  # correctness, small format reward


# ------------------------------------------------------------------------------------ rewards
def test_reward_specs_load_or_fail_clearly(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards_a.py").write_text(TOY_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("toy_rewards_a:first_letter")
    assert fn("p", " apple") == 1.0 and fn("p", "zebra") == 0.0
    for spec, message in [("no_colon", "expected module:function"), ("toy_rewards_a:", "expected module:function"),
                          ("no_such_module_xyz:f", "cannot import module"),
                          ("toy_rewards_a:missing", "has no attribute"),
                          ("toy_rewards_a:not_callable", "not callable"),
                          ("toy_rewards_a:no_args", "must accept")]:
        with pytest.raises(ValueError, match=message) as info:
            load_reward(spec)
        assert "--reward" in str(info.value)


def test_builtin_rewards_and_fields():
    fns = [load_reward("correctness"), load_reward("format")]
    got = score_completions(fns, ["add: 1 + 2"] * 2, [" 3", "4"], ["stop", "length"],
                            [{"answer": "3", "task": "add"}] * 2)
    assert got.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="answer"):
        score_completions(fns[:1], ["p"], ["x"], ["stop"], [{}])


# ------------------------------------------------------------------- training: 2 ranks, ZeRO-3

def _toy_checkpoint(path, tokenizer_dir) -> str:
    from tritium.model.tokenizer import Tokenizer
    from tritium.model.transformer import Transformer

    torch.manual_seed(0)
    Transformer(ModelConfig(**TOY_MODEL)).save_pretrained(path)
    Tokenizer.load(tokenizer_dir).save(path)
    return str(path)


def _zero3_worker(rank: int, world: int, port: int, out_dir: str, checkpoint: str) -> None:
    import sys

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sys.path.insert(0, out_dir)
    from tritium.align.grpo import RolloutSource, embedded_prompts, make_grpo_loss, token_logps
    from tritium.model.tokenizer import Tokenizer
    from tritium.model.transformer import Transformer
    from tritium.serve.sampling import SamplingParams
    from tritium.train.config import TrainConfig
    from tritium.train.trainer import fit

    cfg = GRPOConfig(num_generations=8, max_completion_tokens=4, rewards=("toy_rewards_b:first_letter",),
                     per_task=20)
    # a high lr: the toy policy collapses onto rewarded first tokens within a few steps (deterministic seeds)
    train_cfg = TrainConfig(seq_len=128, micro_batch=16, grad_accum=1, max_steps=8, lr=1e-1, warmup_steps=0,
                            min_lr_ratio=1.0, weight_decay=0.0, zero_stage=3, precision="fp32", out=out_dir,
                            log_interval=1, eval_interval=0, save_interval=0, progress=False, export=False,
                            init_from=checkpoint)
    tokenizer = Tokenizer.load(checkpoint)
    policy = Transformer.from_pretrained(checkpoint, dtype=torch.float32)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    source = RolloutSource(policy, tokenizer, embedded_prompts(0, 20), cfg, 16, 1)
    result = fit(train_cfg, make_batches=source, loss_fn=make_grpo_loss(cfg), tokenizer=tokenizer, model=policy)
    # weight sync after training: the engine (on the rank-local replica) scores exactly as the ZeRO-3 policy does
    source.rollout(10_000, rank, world)  # syncs (a collective gather on every rank), then generates
    moved = any(not torch.equal(start[n], p) for n, p in source._replica.named_parameters())
    prompt = source.prompts[rank][1]
    source._engine.add_request("check", prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=True,
                                                               ignore_eos=True))
    out = source._engine.run_to_completion()["check"]
    ids = torch.tensor([prompt + out.token_ids])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) - 1:-1] = torch.tensor(out.token_ids)
    engine_module = policy  # DeepSpeed wrapped it in place: partitioned, gathered by its hooks in forward
    with torch.no_grad():
        policy_logps = token_logps(engine_module, ids, labels)[0, len(prompt) - 1:-1]
    report = {"moved": moved, "engine_logps": out.logprobs, "policy_logps": policy_logps.tolist(),
              "zero3": all(hasattr(p, "ds_id") for p in policy.parameters())}
    if rank == 0:
        report["rewards"] = [r["reward"] for r in result.history]
        report["records"] = result.history
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_zero3_reward_rises_and_engine_matches_policy(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "toy_rewards_b.py").write_text(TOY_REWARDS)
    checkpoint = _toy_checkpoint(tmp_path / "ckpt", tiny_tokenizer_dir)
    mp.start_processes(_zero3_worker, args=(2, free_port(), str(tmp_path), checkpoint), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rewards = ranks[0]["rewards"]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.2, rewards
    last = ranks[0]["records"][-1]
    for key in ("reward_first_letter", "reward_std", "zero_std_frac", "kl", "completion_len", "gen_tokens_per_s",
                "gen_time_share", "clip_ratio"):
        assert key in last, key
    for report in ranks:
        assert report["zero3"] and report["moved"]
        torch.testing.assert_close(torch.tensor(report["engine_logps"]), torch.tensor(report["policy_logps"]),
                                   atol=2e-4, rtol=0)


# ------------------------------------------------------------------------------ the command line
def test_cli_grpo_then_align_eval_row(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    from tritium.cli import main

    (tmp_path / "toy_rewards_c.py").write_text(TOY_REWARDS)
    monkeypatch.chdir(tmp_path)
    checkpoint = _toy_checkpoint(tmp_path / "sft" / "final", tiny_tokenizer_dir)
    common = ["--checkpoint", checkpoint, "--per-task", "20", "--num-generations", "4", "--micro-batch", "8",
              "--grad-accum", "1", "--max-tokens", "4", "--no-progress", "--zero-stage", "1",
              "--seq-len", "128"]
    assert main(["grpo", *common, "--out", str(tmp_path / "bad"), "--reward", "toy_rewards_c"]) == 2
    assert "--reward 'toy_rewards_c': expected module:function" in capsys.readouterr().err
    out = tmp_path / "grpo"
    assert main(["grpo", *common, "--out", str(out), "--max-steps", "2", "--reward", "toy_rewards_c:first_letter",
                 "--reward", "format", "--beta", "0.05", "--num-iterations", "2", "--loss-type", "dapo",
                 "--oversample", "2"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {"reward_first_letter", "reward_format", "kl", "zero_std_frac", "trained_zero_std_frac"} <= set(records[-1])
    rollouts = (out / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 1  # two optimizer steps on one generated batch (--num-iterations 2)
    assert (out / "grpo.png").stat().st_size > 0 and (out / "final" / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["grpo"]["beta"] == 0.05 and config["grpo"]["loss_type"] == "dapo" and config["grpo"]["oversample"] == 2

    assert main(["align-eval", "--checkpoint", checkpoint, str(out / "final"), "--out", str(tmp_path / "eval"),
                 "--per-task", "20", "--max-examples", "4", "--max-pairs", "4", "--max-new-tokens", "4"]) == 0
    rows = json.loads((tmp_path / "eval" / "align_eval.json").read_text())
    assert [r["label"] for r in rows] == ["sft", "grpo"]
    assert "| grpo |" in (tmp_path / "eval" / "table.md").read_text()


def test_prompt_jsonl_keeps_fields_and_names_bad_lines(tmp_path):
    from tritium.align.grpo import load_prompt_jsonl

    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "add: 1 + 2", "answer": "3"}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}], "k": 1}\n')
    records = load_prompt_jsonl(good)
    assert [r.messages[-1]["content"] for r in records] == ["add: 1 + 2", "hi"]
    assert records[0].fields == {"answer": "3"} and records[1].fields == {"k": 1}
    for line, reason in (('{"prompt": 3}', "needs a 'prompt'"), ("[1]", "expected a JSON object"),
                         ("{bad", "invalid JSON"),
                         ('{"messages": [{"role": "assistant", "content": "x"}]}', "user turn")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{reason}"):
            load_prompt_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_jsonl(tmp_path / "empty.jsonl")
