"""``align-eval``: did alignment change behaviour?  Measured on held-out prompts, for several checkpoints.

Per checkpoint, on the embedded tasks' test split (prompts never trained on):

* ``exact_match`` -- greedy reply (the text before ``<|end|>``) equals the verified answer;
* ``format`` -- the reply stopped with ``<|end|>`` within ``max_new_tokens`` (end-of-turn compliance);
* ``pref_accuracy`` / ``pref_margin`` -- on held-out preference pairs, the fraction where the model gives
  the chosen reply a higher summed log-prob than the rejected one, and the mean gap
  ``log p(chosen) - log p(rejected)`` in nats.  Raw log-probs, no reference: every checkpoint is scored
  the same way, so the pretrained, SFT and DPO numbers are comparable.
* with ``--reference CKPT`` (the SFT model): ``reward_accuracy_vs_ref`` / ``reward_margin_vs_ref`` -- DPO's
  own held-out metric, the fraction of pairs whose log-ratio to the reference rose more for the chosen
  reply than for the rejected one (0 for the reference itself).

Greedy decoding here is a deliberately plain loop (full forward per new token, right padding): short
replies on a tiny model, and ``align`` does not depend on ``serve``.  The output is one rich table, a
JSON file and a PNG bar chart (one bar per checkpoint -- pretrained, SFT, DPO, GRPO, ... -- per metric, and
exact match per task).
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tritium.align.data import PreferencePair
from tritium.align.preference import compute_reference_logps, tokenize_pairs
from tritium.align.tasks import TaskExample
from tritium.model.chat import encode_prompt, stop_token_ids

METRICS = ("exact_match", "format", "pref_accuracy", "pref_margin")


@dataclass
class EvalConfig:
    max_new_tokens: int = 24  # generation budget per reply (answers are <= 10 tokens)
    batch_size: int = 64  # prompts per generation batch / pairs per scoring batch
    max_examples: int = 400  # held-out prompts scored per checkpoint (the whole test split by default)
    max_pairs: int = 400  # held-out preference pairs scored per checkpoint

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "max_examples", "max_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be a positive integer, got {value!r}")


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int], pad_id: int) -> list[tuple[list[int], bool]]:
    """Greedy continuation of each prompt: (new token ids without the stop token, stopped?)."""
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    sequences = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    stops = {int(s) for s in stop_ids}
    for _ in range(max_new_tokens):
        active = [i for i, done in enumerate(stopped) if not done and len(sequences[i]) < max_len]
        if not active:
            break
        width = max(len(sequences[i]) for i in active)
        ids = torch.full((len(active), width), pad_id, dtype=torch.long)
        for row, i in enumerate(active):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
        ids = ids.to(device)
        hidden = model.forward_hidden(ids)  # (B, T, H); right padding never reaches earlier positions
        last = torch.tensor([len(sequences[i]) - 1 for i in active], device=device)
        logits = hidden[torch.arange(len(active), device=device), last].float() @ model.lm_head_weight.float().T
        next_ids = logits.argmax(-1).tolist()
        for i, token in zip(active, next_ids):
            if token in stops:
                stopped[i] = True
            else:
                outputs[i].append(token)
                sequences[i].append(token)
    return list(zip(outputs, stopped))


@torch.no_grad()
def score_tasks(model: torch.nn.Module, tokenizer: Any, examples: Sequence[TaskExample], cfg: EvalConfig
                ) -> dict[str, Any]:
    examples = list(examples)[:cfg.max_examples]
    prompts = [encode_prompt(tokenizer, ex.messages(with_answer=False)) for ex in examples]
    stops = stop_token_ids(tokenizer)
    correct, formatted = 0, 0
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    samples = []
    for start in range(0, len(examples), cfg.batch_size):
        chunk = examples[start:start + cfg.batch_size]
        results = greedy_generate(model, prompts[start:start + cfg.batch_size], cfg.max_new_tokens, stops,
                                  tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0)
        for example, (ids, stopped) in zip(chunk, results):
            reply = tokenizer.decode(ids)
            ok = example.verify(reply)
            correct += ok
            formatted += stopped
            per_task[example.task][0] += ok
            per_task[example.task][1] += 1
            if len(samples) < 8:
                samples.append({"prompt": example.prompt, "answer": example.answer, "reply": reply,
                                "stopped": stopped})
    n = max(len(examples), 1)
    return {"exact_match": correct / n, "format": formatted / n, "num_examples": len(examples),
            "per_task": {task: hits / total for task, (hits, total) in sorted(per_task.items())},
            "samples": samples}


@torch.no_grad()
def pair_logps(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], cfg: EvalConfig
               ) -> torch.Tensor:
    """(num_pairs, 2) summed reply log-probs [chosen, rejected] under ``model``."""
    tokenized, _ = tokenize_pairs(tokenizer, list(pairs)[:cfg.max_pairs], model.config.max_seq_len, warn=False)
    if not tokenized:
        return torch.zeros(0, 2)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
    return compute_reference_logps(model, tokenized, pad_id, cfg.batch_size)[[p.index for p in tokenized]]


def score_preferences(logps: torch.Tensor, reference_logps: torch.Tensor | None = None) -> dict[str, Any]:
    """Preference accuracy/margin from raw log-probs; with a reference, also the implicit-reward ones."""
    if logps.numel() == 0:
        return {"pref_accuracy": float("nan"), "pref_margin": float("nan"), "num_pairs": 0}
    gap = logps[:, 0] - logps[:, 1]
    result = {"pref_accuracy": (gap > 0).float().mean().item(), "pref_margin": gap.mean().item(),
              "num_pairs": int(gap.numel())}
    if reference_logps is not None:
        if reference_logps.shape != logps.shape:
            raise ValueError(f"reference scored {reference_logps.shape[0]} pairs but the checkpoint {logps.shape[0]}: "
                             "the reference must share the checkpoint's tokenizer")
        # DPO's implicit reward: did the checkpoint move log p(chosen) up relative to log p(rejected),
        # compared with the reference? (0 / 0 for the reference itself)
        ratio = logps - reference_logps
        implicit = ratio[:, 0] - ratio[:, 1]
        result["reward_accuracy_vs_ref"] = (implicit > 0).float().mean().item()
        result["reward_margin_vs_ref"] = implicit.mean().item()
    return result


def evaluate_model(model: torch.nn.Module, tokenizer: Any, examples: Sequence[TaskExample],
                   pairs: Sequence[PreferencePair], cfg: EvalConfig | None = None,
                   reference_logps: torch.Tensor | None = None) -> dict[str, Any]:
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    try:
        result = score_tasks(model, tokenizer, examples, cfg)
        result.update(score_preferences(pair_logps(model, tokenizer, pairs, cfg), reference_logps))
    finally:
        model.train(was_training)
    return result


def evaluate_checkpoints(checkpoints: Sequence[str | Path], examples: Sequence[TaskExample],
                         pairs: Sequence[PreferencePair], cfg: EvalConfig | None = None,
                         labels: Sequence[str] | None = None, device: str = "cpu",
                         reference: str | Path | None = None) -> list[dict[str, Any]]:
    """One result dict per checkpoint directory (HF layout + tokenizer.model).

    ``reference`` (e.g. the SFT checkpoint) adds ``reward_accuracy_vs_ref``/``reward_margin_vs_ref``:
    DPO's implicit-reward accuracy on the held-out pairs.
    """
    from tritium.model.tokenizer import Tokenizer
    from tritium.model.transformer import Transformer

    labels = list(labels) if labels else [_label(c) for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise ValueError(f"--labels has {len(labels)} names for {len(checkpoints)} checkpoints")
    cfg = cfg or EvalConfig()
    reference_logps = None
    if reference is not None:
        ref_model = Transformer.from_pretrained(reference, device=device, dtype=torch.float32)
        reference_logps = pair_logps(ref_model, Tokenizer.load(reference), pairs, cfg)
        del ref_model
    rows = []
    for label, checkpoint in zip(labels, checkpoints):
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
        tokenizer = Tokenizer.load(checkpoint)
        model = Transformer.from_pretrained(checkpoint, device=device, dtype=torch.float32)
        result = evaluate_model(model, tokenizer, examples, pairs, cfg, reference_logps)
        rows.append({"label": label, "checkpoint": str(checkpoint), **result})
        del model
    return rows


def _label(checkpoint: str | Path) -> str:
    """runs/sft/final -> "sft"; any other dir -> its name."""
    path = Path(checkpoint)
    return path.parent.name if path.name == "final" and path.parent.name else path.name


# ------------------------------------------------------------------------------------------ report
def render_table(rows: Sequence[dict[str, Any]], title: str = "align-eval (embedded tasks, held-out test split)"):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("checkpoint")
    for name in ("exact match", "format", "pref acc", "pref margin (nats)"):
        table.add_column(name, justify="right")
    with_ref = any("reward_accuracy_vs_ref" in row for row in rows)
    if with_ref:
        table.add_column("reward acc vs ref", justify="right")
        table.add_column("reward margin vs ref", justify="right")
    tasks = sorted({task for row in rows for task in row.get("per_task", {})})
    for task in tasks:
        table.add_column(f"EM {task}", justify="right")
    for row in rows:
        table.add_row(row["label"], f"{row['exact_match']:.1%}", f"{row['format']:.1%}",
                      f"{row['pref_accuracy']:.1%}", f"{row['pref_margin']:+.2f}",
                      *([f"{row['reward_accuracy_vs_ref']:.1%}", f"{row['reward_margin_vs_ref']:+.2f}"]
                        if with_ref else []),
                      *[f"{row['per_task'].get(task, float('nan')):.0%}" for task in tasks])
    return table


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``align_eval.json``, ``table.md`` and ``align_eval.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "align_eval.json"
    json_path.write_text(json.dumps(list(rows), indent=2) + "\n")
    markdown_path = out / "table.md"
    markdown_path.write_text(markdown_table(rows))
    png_path = out / "align_eval.png"
    plot(rows, png_path)
    return {"json": json_path, "markdown": markdown_path, "png": png_path}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table as Markdown (for reports)."""
    with_ref = any("reward_accuracy_vs_ref" in row for row in rows)
    tasks = sorted({task for row in rows for task in row.get("per_task", {})})
    header = ["checkpoint", "exact match", "stops at <\\|end\\|>", "pref accuracy", "pref margin (nats)"]
    header += ["reward acc vs ref", "reward margin vs ref"] if with_ref else []
    header += [f"EM {task}" for task in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], f"{row['exact_match']:.1%}", f"{row['format']:.1%}", f"{row['pref_accuracy']:.1%}",
                 f"{row['pref_margin']:+.2f}"]
        if with_ref:
            cells += [f"{row.get('reward_accuracy_vs_ref', float('nan')):.1%}",
                      f"{row.get('reward_margin_vs_ref', float('nan')):+.2f}"]
        cells += [f"{row['per_task'].get(task, float('nan')):.0%}" for task in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["exact_match", "format", "pref_accuracy"]
    tasks = sorted({task for row in rows for task in row.get("per_task", {})})
    # one bar per checkpoint (pretrained, sft, dpo, grpo, ...) in each group; per-task exact match on the right
    fig, (ax, ax_tasks) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, max(len(tasks), 1)]})
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, [row[n] for n in names], width, label=row["label"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        task_bars = ax_tasks.bar([j + i * width for j in range(len(tasks))],
                                 [row.get("per_task", {}).get(t, float("nan")) for t in tasks], width,
                                 label=row["label"])
        ax_tasks.bar_label(task_bars, fmt="%.2f", fontsize=6)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(["exact match", "stops at <|end|>", "preference accuracy"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of held-out prompts")
    ax.set_title("alignment on held-out tasks")
    ax.legend(fontsize=8)
    ax_tasks.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(tasks))])
    ax_tasks.set_xticklabels(tasks)
    ax_tasks.set_ylim(0, 1.1)
    ax_tasks.set_title("exact match per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
