"""Supervised fine-tuning: tokenise conversations, pack them, and the masked completion loss.

The pieces, in the order data flows through them:

1. ``tokenize_conversations`` -- ``encode_chat`` per conversation gives ``(ids, loss_mask)``; too-long
   examples are truncated or dropped (``SFTConfig.truncation``) and counted, with one warning.
2. ``shifted_labels`` -- the model takes already-shifted labels: ``labels[t] = ids[t+1]`` where token
   ``t+1`` carries loss, else -100.  Shifting happens *per example*, so the last token of one packed
   example never learns to predict the first token of the next.
3. ``pack_rows`` / ``SFTBatches`` -- several examples share one row of ``seq_len`` tokens; ``cu_seqlens``
   (over the flattened ``B*T`` tokens) marks where each starts, so varlen attention keeps packed
   examples from attending to each other, and ``position_ids`` restart at 0 for each.  The padding at
   the end of a row is its own segment with no loss.  ``packing=False`` gives one example per row.
4. ``sft_objective`` -- the ``Objective`` for ``tritium.train.trainer.fit``: summed next-token NLL over the
   completion tokens, counted by completion tokens, so a step's loss is the mean over every completion
   token of the step whatever the micro-batch/rank split (``sft_loss`` is one micro-batch's mean).
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tritium.model.chat import encode_chat
from tritium.train.loop import Objective, count_targets

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("right", "drop")


@dataclass
class SFTConfig:
    seq_len: int = 256  # tokens per packed row (an example longer than this is truncated or dropped)
    packing: bool = True  # several examples per row with cu_seqlens; False = one example per row
    truncation: str = "right"  # "right": cut the end off a too-long example; "drop": skip it
    seed: int = 0  # shuffles the example order per epoch
    per_task: int = 1200  # embedded tasks: distinct prompts per task (before the 80/10/10 split)
    skip_malformed: bool = False  # JSONL: skip and count bad lines instead of stopping at the first

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"SFTConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"SFTConfig.truncation must be one of {TRUNCATION_POLICIES}, got {self.truncation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenizeStats:
    examples: int = 0  # conversations seen
    kept: int = 0  # examples that made it into the dataset
    truncated: int = 0  # examples cut to seq_len (policy "right")
    dropped_too_long: int = 0  # examples skipped for length (policy "drop")
    dropped_no_target: int = 0  # examples with no loss-carrying token left (after truncation)
    target_tokens: int = 0  # loss-carrying tokens over all kept examples


def tokenize_conversations(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]], seq_len: int,
                           truncation: str = "right", warn: bool = True
                           ) -> tuple[list[tuple[list[int], list[int]]], TokenizeStats]:
    """``(ids, loss_mask)`` per conversation, each at most ``seq_len`` tokens, plus what was cut."""
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    stats = TokenizeStats()
    examples = []
    for messages in conversations:
        stats.examples += 1
        ids, mask = encode_chat(tokenizer, messages)
        if len(ids) > seq_len:
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats.truncated += 1
        # the first token is never a target (nothing precedes it)
        if sum(mask[1:]) == 0:
            stats.dropped_no_target += 1
            continue
        examples.append((ids, mask))
        stats.kept += 1
        stats.target_tokens += sum(mask[1:])
    if warn and (stats.truncated or stats.dropped_too_long or stats.dropped_no_target):
        warnings.warn(f"SFT data: {stats.truncated} example(s) truncated to {seq_len} tokens, "
                      f"{stats.dropped_too_long} dropped as too long, {stats.dropped_no_target} dropped with no "
                      f"completion token left (of {stats.examples})", stacklevel=2)
    return examples, stats


def shifted_labels(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """``labels[t] = ids[t+1]`` where ``mask[t+1]``, else -100; the last position has no target."""
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def pack_rows(examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packing: bool = True
              ) -> list[dict[str, list]]:
    """Greedy in-order packing into rows of exactly ``seq_len`` tokens.

    Each row: ``input_ids``, ``labels``, ``position_ids`` (restarting per example) and ``doc_lens``
    (example lengths, then the padding tail) that ``collate_rows`` turns into ``cu_seqlens``.
    """
    rows: list[dict[str, list]] = []
    current: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "doc_lens": []}

    def close() -> None:
        nonlocal current
        used = len(current["input_ids"])
        if used == 0:
            return
        pad = seq_len - used
        if pad:
            current["input_ids"] += [pad_id] * pad
            current["labels"] += [IGNORE_INDEX] * pad
            current["position_ids"] += list(range(pad))
            current["doc_lens"].append(pad)
        rows.append(current)
        current = {"input_ids": [], "labels": [], "position_ids": [], "doc_lens": []}

    for ids, mask in examples:
        if len(ids) > seq_len:
            raise ValueError(f"example of {len(ids)} tokens exceeds seq_len={seq_len}; tokenize with truncation")
        if not packing or len(current["input_ids"]) + len(ids) > seq_len:
            close()
        current["input_ids"] += list(ids)
        current["labels"] += shifted_labels(ids, mask)
        current["position_ids"] += list(range(len(ids)))
        current["doc_lens"].append(len(ids))
    close()
    return rows


def collate_rows(rows: Sequence[Mapping[str, list]]) -> dict[str, torch.Tensor]:
    """Stack rows into a micro-batch; ``cu_seqlens`` indexes the flattened ``B*T`` tokens."""
    boundaries = [0]
    for row in rows:
        for length in row["doc_lens"]:
            boundaries.append(boundaries[-1] + length)
    return {
        "input_ids": torch.tensor([row["input_ids"] for row in rows], dtype=torch.long),
        "labels": torch.tensor([row["labels"] for row in rows], dtype=torch.long),
        "position_ids": torch.tensor([row["position_ids"] for row in rows], dtype=torch.long),
        "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
    }


def collate_padded(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest (causal attention never sees the padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids, labels = [], []
    for ids, mask in examples:
        pad = width - len(ids)
        input_ids.append(list(ids) + [pad_id] * pad)
        labels.append(shifted_labels(ids, mask) + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


class EpochBatches:
    """Micro-batches rebuilt each epoch (``epoch_batches``) and dealt to ranks in equal counts.

    The shared part of SFT and preference batching; a subclass builds one epoch's list.
    """

    too_few = "too few micro-batches for world_size={world}"  # the error when a rank would get none

    def epoch_batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Endless stream for ``rank``, skipping the first ``start`` micro-batches (resume)."""
        consumed, epoch = 0, 0
        while True:
            every = self.epoch_batches(epoch)
            # equal count per rank so no rank waits at a collective for a batch that never comes
            mine = every[rank::world][:len(every) // world]
            if not mine:
                raise ValueError(self.too_few.format(world=world))
            for batch in mine:
                if consumed >= start:
                    yield batch
                consumed += 1
            epoch += 1

    def finite(self, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over epoch 0's micro-batches for ``rank`` -- for evaluation."""
        return iter(self.epoch_batches(0)[rank::world])


class SFTBatches(EpochBatches):
    """Deterministic, resumable, rank-disjoint micro-batches of packed rows, cycling over epochs.

    Epoch ``e`` shuffles the examples with ``(seed, e)`` before packing, so every rank builds the same
    rows and takes every ``world``-th micro-batch.  Matches ``fit``'s ``make_batches(start, rank, world)``.
    """

    too_few = "too little SFT data for world_size={world}: fewer micro-batches than ranks"

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                 micro_batch: int, seed: int = 0, packing: bool = True, shuffle: bool = True) -> None:
        if not examples:
            raise ValueError("SFT dataset is empty (every example was dropped or the file had none)")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self.micro_batch, self.seed, self.packing, self.shuffle = micro_batch, seed, packing, shuffle

    def epoch_batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"sft:{self.seed}:{epoch}").shuffle(order)
        rows = pack_rows([self.examples[i] for i in order], self.seq_len, self.pad_id, self.packing)
        return [collate_rows(rows[i:i + self.micro_batch]) for i in range(0, len(rows), self.micro_batch)]

    def batches_per_epoch(self, world: int = 1) -> int:
        return len(self.epoch_batches(0)) // max(world, 1)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward() keyword arguments present in a batch (cu_seqlens/position_ids only when packed)."""
    return {key: batch[key] for key in ("input_ids", "position_ids", "cu_seqlens") if key in batch}


def summed_completion_nll(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Summed next-token NLL over the completion tokens (labels != -100) of one micro-batch."""
    labels = batch["labels"]
    total = model(**model_inputs(batch), labels=labels, loss_reduction="sum")  # ignored positions add 0
    return total, {"target_tokens": float(count_targets(batch)), "num_tokens": batch["input_ids"].numel()}


# The SFT objective: a step's loss = summed completion NLL of all its micro-batches and ranks / their
# completion tokens (tritium.train.loop), never a mean of per-micro-batch means.
sft_objective = Objective(loss=summed_completion_nll, count=count_targets, name="SFT completion NLL")


def sft_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masked completion loss of ONE micro-batch: mean NLL over the tokens whose label is not -100.

    For evaluation and plain PyTorch loops; training goes through ``sft_objective``, which normalises
    by the whole optimizer step's completion tokens instead.
    """
    return sft_objective.mean(model, batch)


# ------------------------------------------------------------------------------------- the run
def sft_datasets(tokenizer: Any, cfg: SFTConfig, data: str | None = None, val_data: str | None = None
                 ) -> tuple[list, list, dict[str, Any]]:
    """(train examples, val examples, info) from JSONL files or, without ``data``, the embedded tasks.

    With ``data`` but no ``val_data``, a seed-fixed 5% of the conversations (at least one) is held out.
    """
    from tritium.align.data import load_sft_jsonl
    from tritium.align.tasks import make_splits, sft_conversations

    info: dict[str, Any] = {}
    if data is None:
        splits = make_splits(seed=cfg.seed, per_task=cfg.per_task)
        train_convs, val_convs = sft_conversations(splits["train"]), sft_conversations(splits["val"])
        info["source"] = f"embedded tasks (seed {cfg.seed}, {cfg.per_task} prompts per task)"
    else:
        train_convs, stats = load_sft_jsonl(data, skip_malformed=cfg.skip_malformed)
        info["source"], info["read"] = str(data), stats.summary()
        if val_data is not None:
            val_convs, val_stats = load_sft_jsonl(val_data, skip_malformed=cfg.skip_malformed)
            info["val_read"] = val_stats.summary()
        else:
            order = list(range(len(train_convs)))
            random.Random(f"sft-val:{cfg.seed}").shuffle(order)
            n_val = max(1, len(order) // 20) if len(order) > 1 else 0
            held = set(order[:n_val])
            val_convs = [c for i, c in enumerate(train_convs) if i in held]
            train_convs = [c for i, c in enumerate(train_convs) if i not in held]
    train, train_stats = tokenize_conversations(tokenizer, train_convs, cfg.seq_len, cfg.truncation)
    val, _ = tokenize_conversations(tokenizer, val_convs, cfg.seq_len, cfg.truncation, warn=False)
    info["train_tokenize"], info["val_examples"] = asdict(train_stats), len(val)
    return train, val, info


def train_sft(train_cfg: Any, cfg: SFTConfig, checkpoint: str, data: str | None = None,
              val_data: str | None = None):
    """Fine-tune ``checkpoint`` on the SFT data with ``tritium.train.trainer.fit`` (the shared loop).

    Returns fit's ``RunResult``; the run folder gets config.json (with an "sft" section), metrics.jsonl,
    checkpoints/, final/ (HF layout + tokenizer.model) and loss.png.
    """
    from tritium.model.tokenizer import Tokenizer
    from tritium.train.trainer import fit

    tokenizer = Tokenizer.load(checkpoint)
    if train_cfg.seq_len != cfg.seq_len:
        cfg.seq_len = train_cfg.seq_len  # one length: rows are packed to exactly the loop's seq_len
    train, val, info = sft_datasets(tokenizer, cfg, data, val_data)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
    source = SFTBatches(train, cfg.seq_len, pad_id, train_cfg.micro_batch, seed=cfg.seed, packing=cfg.packing)
    val_source = SFTBatches(val, cfg.seq_len, pad_id, train_cfg.micro_batch, seed=cfg.seed, packing=cfg.packing,
                            shuffle=False) if val else None
    # validation uses the same rule: val_loss is the exact mean completion NLL of the validation set
    return fit(train_cfg, make_batches=source, loss_fn=sft_objective, tokenizer=tokenizer, init_from=checkpoint,
               make_eval_batches=val_source.finite if val_source else None,
               extra_config={"sft": cfg.to_dict(), "sft_data": info, "checkpoint": str(checkpoint)})
