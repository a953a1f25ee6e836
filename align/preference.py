"""Preference tuning: DPO (with cDPO label smoothing), IPO and SimPO on the shared training loop.

Notation per pair: ``pc, pr`` = policy log-prob of the chosen / rejected reply (summed over the reply's
tokens, its ``<|end|>`` included), ``rc, rr`` = the same under the frozen reference, ``|c|, |r|`` =
reply lengths in tokens, ``s = logsigmoid``.

* DPO (Rafailov et al. 2023):  ``z = beta * ((pc - rc) - (pr - rr))``;
  ``loss = -(1 - eps) * s(z) - eps * s(-z)`` -- ``eps`` = label smoothing, the conservative cDPO
  variant that assumes a fraction ``eps`` of the labels is flipped.
* IPO (Azar et al. 2023):  ``h = (pc - rc) - (pr - rr)``; ``loss = (h - 1 / (2 * beta)) ** 2`` -- a
  squared loss that pulls the log-ratio gap to a finite target instead of pushing it to infinity.
  Summed log-probs as in the paper (TRL divides by length; pass ``length_normalize=True`` for that).
* SimPO (Meng et al. 2024), reference-free:  ``z = beta * (pc / |c| - pr / |r|) - gamma``;
  ``loss = -(1 - eps) * s(z) - eps * s(-z)``.

Optional ``sft_weight = alpha`` adds ``alpha * (-pc / |c|)``, the chosen reply's mean NLL (RPO, Pang et al.
2024; TRL's ``rpo_alpha``): DPO alone often lowers the chosen reply's likelihood along with the
rejected one ("likelihood displacement"), which costs generation quality; the NLL term anchors it.

Implicit rewards (for metrics): ``beta * (pc - rc)`` and ``beta * (pr - rr)`` for DPO/IPO,
``beta * pc / |c|`` and ``beta * pr / |r|`` for SimPO; reward accuracy = fraction of pairs whose chosen
reward is larger; margin = mean difference.  ``kl`` = mean of ``policy - reference`` log-prob over the
chosen and rejected replies: an estimate of KL(policy || reference) on the *dataset's* replies (not on
samples from the policy), so it is a drift indicator and can be negative.

All chosen and rejected sequences go through ONE forward: a micro-batch of ``B`` pairs is a
``(2B, T)`` tensor, chosen rows first, right-padded (causal attention never sees the padding); the model's
``loss_reduction="none"`` per-token NLL, summed over the reply, is minus the log-prob.

The reference: by default its log-probs are computed once, before training, from the starting
checkpoint (which *is* the reference: DPO starts the policy there), and cached to disk next to the run
(``reference="cached"``).  That is correct under every ZeRO stage, including 3: no second model lives
during training, and the reference forward runs on a plain, unsharded copy only once.
``reference="model"`` keeps a frozen copy instead (``ReferenceModel``: no grads, eval mode); under
ZeRO-3 that copy is a full, unsharded replica on every rank (correct, but it costs the memory ZeRO-3
saved), so "cached" is what to use there.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tritium.align.data import PreferencePair
from tritium.align.sft import IGNORE_INDEX, EpochBatches, collate_padded
from tritium.model.chat import encode_chat
from tritium.train.loop import Objective

LOSS_TYPES = ("dpo", "ipo", "simpo")
REFERENCE_MODES = ("cached", "model", "none")


@dataclass
class PreferenceConfig:
    loss: str = "dpo"  # "dpo" (with label smoothing = cDPO), "ipo", or "simpo" (reference-free)
    beta: float = 0.1  # DPO/IPO: strength of the KL leash to the reference; SimPO: reward scale (~2)
    label_smoothing: float = 0.0  # cDPO / SimPO: assumed fraction of flipped preference labels, in [0, 0.5)
    gamma: float = 0.5  # SimPO: target reward margin
    length_normalize: bool = False  # DPO/IPO: average log-probs over reply tokens instead of summing
    sft_weight: float = 0.0  # RPO: + sft_weight x mean NLL of the chosen reply (keeps its likelihood up)
    reference: str = "cached"  # "cached": reference log-probs computed once and stored; "model": frozen copy
    max_len: int = 256  # longest prompt+reply in tokens; longer pairs are dropped (counted, one warning)
    seed: int = 0  # shuffles pair order per epoch

    def __post_init__(self) -> None:
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"PreferenceConfig.loss must be one of {LOSS_TYPES}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"PreferenceConfig.beta must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"PreferenceConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("PreferenceConfig.label_smoothing applies to dpo/simpo, not ipo")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"PreferenceConfig.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.loss != "simpo" and self.reference == "none":
            raise ValueError(f"PreferenceConfig: loss={self.loss!r} needs a reference ('cached' or 'model'); "
                             "only simpo is reference-free")
        if self.loss == "simpo":
            self.reference = "none"  # reference-free: never build or cache one
        if not self.sft_weight >= 0:
            raise ValueError(f"PreferenceConfig.sft_weight must be >= 0, got {self.sft_weight!r}")
        if not isinstance(self.max_len, int) or self.max_len < 4:
            raise ValueError(f"PreferenceConfig.max_len must be an integer >= 4, got {self.max_len!r}")

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- the losses
def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *, loss: str = "dpo",
                    beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                    length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,), chosen rewards (B,), rejected rewards (B,) from summed log-probs (B,)."""
    if loss not in LOSS_TYPES:
        raise ValueError(f"loss must be one of {LOSS_TYPES}, got {loss!r}")
    chosen_lengths = chosen_lengths.to(policy_chosen.dtype).clamp(min=1)
    rejected_lengths = rejected_lengths.to(policy_chosen.dtype).clamp(min=1)
    if loss == "simpo":
        chosen_rewards = beta * policy_chosen / chosen_lengths
        rejected_rewards = beta * policy_rejected / rejected_lengths
        z = chosen_rewards - rejected_rewards - gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss={loss!r} needs reference log-probs")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if length_normalize:
        chosen_ratio, rejected_ratio = chosen_ratio / chosen_lengths, rejected_ratio / rejected_lengths
    gap = chosen_ratio - rejected_ratio
    if loss == "dpo":
        z = beta * gap
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:  # ipo
        losses = (gap - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# --------------------------------------------------------------------------------- tokenisation
@dataclass
class TokenizedPair:
    index: int  # position in the dataset (keys the cached reference log-probs)
    chosen: tuple[list[int], list[int]]  # (ids, loss_mask) of prompt + chosen reply
    rejected: tuple[list[int], list[int]]  # (ids, loss_mask) of prompt + rejected reply


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_len: int, warn: bool = True
                   ) -> tuple[list[TokenizedPair], int]:
    """Tokenise pairs; loss mask covers only the final reply (earlier assistant turns are prompt)."""
    out, dropped = [], 0
    for index, pair in enumerate(pairs):
        prompt_ids, _ = encode_chat(tokenizer, pair.prompt, add_generation_prompt=True)
        sides = []
        for messages in (pair.chosen_messages(), pair.rejected_messages()):
            ids, _ = encode_chat(tokenizer, messages)
            # The template is built segment by segment, so the prompt (with its <|assistant|>) is
            # a prefix of the full conversation; the reply is everything after it.
            assert ids[:len(prompt_ids)] == prompt_ids
            sides.append((ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))))
        if max(len(sides[0][0]), len(sides[1][0])) > max_len:
            dropped += 1
            continue
        out.append(TokenizedPair(index, sides[0], sides[1]))
    if warn and dropped:
        warnings.warn(f"preference data: {dropped} of {len(pairs)} pair(s) longer than {max_len} tokens "
                      "dropped", stacklevel=2)
    return out, dropped


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int,
                  reference_logps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``B`` pairs -> one ``(2B, T)`` batch, chosen rows first; reply lengths; cached reference log-probs."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["reply_lengths"] = (batch["labels"] != IGNORE_INDEX).sum(-1)
    batch["pair_index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    if reference_logps is not None:  # (num_pairs, 2): chosen, rejected
        rows = reference_logps[batch["pair_index"]]
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = rows[:, 0].clone(), rows[:, 1].clone()
    return batch


class PreferenceBatches(EpochBatches):
    """Deterministic, resumable, rank-disjoint micro-batches of pairs (``fit``'s ``make_batches``)."""

    too_few = "too few preference pairs for world_size={world}"

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int, micro_batch: int, seed: int = 0,
                 reference_logps: torch.Tensor | None = None, shuffle: bool = True) -> None:
        if not pairs:
            raise ValueError("preference dataset is empty (every pair was dropped or the file had none)")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.pairs, self.pad_id, self.micro_batch = list(pairs), pad_id, micro_batch
        self.seed, self.reference_logps, self.shuffle = seed, reference_logps, shuffle

    def epoch_batches(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        order = list(range(len(self.pairs)))
        if self.shuffle:
            random.Random(f"pairs:{self.seed}:{epoch}").shuffle(order)
        chunks = [order[i:i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
        return [collate_pairs([self.pairs[i] for i in chunk], self.pad_id, self.reference_logps)
                for chunk in chunks]


# ------------------------------------------------------------------------------- log-probabilities
def sequence_logps(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reply log-prob per row (2B,) and reply lengths (2B,), from ONE forward over all rows."""
    labels = batch["labels"]
    token_nll = model(input_ids=batch["input_ids"], labels=labels, loss_reduction="none")  # (2B, T)
    mask = (labels != IGNORE_INDEX).to(token_nll.dtype)
    return -(token_nll.float() * mask).sum(-1), (labels != IGNORE_INDEX).sum(-1)


class ReferenceModel:
    """A frozen copy of the starting policy: no gradients, eval mode, never stepped by any optimizer.

    Not an ``nn.Module`` attribute of the policy, so DeepSpeed never sees (or shards) it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def copy_of(cls, model: torch.nn.Module) -> ReferenceModel:
        return cls(copy.deepcopy(model))

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> ReferenceModel:
        from tritium.model.transformer import Transformer

        return cls(Transformer.from_pretrained(checkpoint, dtype=dtype, device=device))

    @torch.no_grad()
    def logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        moved = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels")}
        return sequence_logps(self.model, moved)[0]


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, pairs: Sequence[TokenizedPair], pad_id: int,
                            micro_batch: int = 16) -> torch.Tensor:
    """(max pair index + 1, 2) tensor of [chosen, rejected] summed log-probs under ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.full((max(p.index for p in pairs) + 1, 2), float("nan"))
    for i in range(0, len(pairs), micro_batch):
        chunk = pairs[i:i + micro_batch]
        batch = collate_pairs(chunk, pad_id)
        logps, _ = sequence_logps(model, {k: batch[k].to(device) for k in ("input_ids", "labels")})
        index = batch["pair_index"]
        out[index, 0], out[index, 1] = logps[:len(chunk)].cpu(), logps[len(chunk):].cpu()
    model.train(was_training)
    return out


def pairs_fingerprint(pairs: Sequence[TokenizedPair], checkpoint_id: str) -> str:
    digest = hashlib.sha256(checkpoint_id.encode())
    for pair in pairs:
        digest.update(json.dumps([pair.index, pair.chosen[0], pair.rejected[0], pair.chosen[1],
                                  pair.rejected[1]]).encode())
    return digest.hexdigest()


def checkpoint_id(checkpoint: str | Path) -> str:
    """Identity of a checkpoint's weights: sha256 of its safetensors file(s) (size+mtime would lie)."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha256()
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {checkpoint}")
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cached_reference_logps(checkpoint: str | Path, pairs: Sequence[TokenizedPair], pad_id: int, cache_path: str | Path,
                           device: str | torch.device = "cpu", micro_batch: int = 16) -> torch.Tensor:
    """Reference log-probs of ``pairs`` under ``checkpoint``, computed once and stored at ``cache_path``.

    The cache is keyed by the checkpoint's weights and the exact token ids; a mismatch recomputes.
    """
    cache_path = Path(cache_path)
    key = pairs_fingerprint(pairs, checkpoint_id(checkpoint))
    if cache_path.is_file():
        stored = torch.load(cache_path, weights_only=True)
        if stored.get("key") == key:
            return stored["logps"]
    reference = ReferenceModel.from_pretrained(checkpoint, device=device)
    logps = compute_reference_logps(reference.model, pairs, pad_id, micro_batch)
    del reference
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")  # ranks computing at once never share a temp file
    torch.save({"key": key, "logps": logps}, tmp)
    tmp.replace(cache_path)
    return logps


def count_pairs(batch: Mapping[str, torch.Tensor]) -> int:
    """Preference pairs in a micro-batch (its ``2B`` rows are B chosen then B rejected)."""
    return int(batch["pair_index"].numel()) if "pair_index" in batch else batch["input_ids"].shape[0] // 2


def make_preference_objective(cfg: PreferenceConfig, reference: ReferenceModel | None = None) -> Objective:
    """The ``Objective`` for ``tritium.train.trainer.fit``: summed per-pair losses, counted in pairs.

    A step's loss is then the mean over every pair of the step (all micro-batches, all ranks).
    Reference log-probs come from the batch (``ref_*_logps``, cached mode) or from ``reference``.
    """
    def summed_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logps, lengths = sequence_logps(model, batch)
        num_pairs = logps.shape[0] // 2
        policy_chosen, policy_rejected = logps[:num_pairs], logps[num_pairs:]
        ref_chosen = ref_rejected = None
        if cfg.needs_reference:
            if "ref_chosen_logps" in batch:
                ref_chosen = batch["ref_chosen_logps"].to(logps)
                ref_rejected = batch["ref_rejected_logps"].to(logps)
            elif reference is not None:
                ref = reference.logps(batch).to(logps)
                ref_chosen, ref_rejected = ref[:num_pairs], ref[num_pairs:]
            else:
                raise ValueError(f"loss={cfg.loss!r} needs reference log-probs: cache them or pass a ReferenceModel")
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths[:num_pairs], lengths[num_pairs:],
            loss=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
            length_normalize=cfg.length_normalize)
        chosen_nll = -(policy_chosen / lengths[:num_pairs].clamp(min=1))  # (B,) mean NLL per chosen reply
        total = losses.sum()
        if cfg.sft_weight:
            total = total + cfg.sft_weight * chosen_nll.sum()
        metrics: dict[str, Any] = {
            "preference_loss": losses.detach().mean(),
            "chosen_nll": chosen_nll.detach().mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_chosen": chosen_rewards.mean(),
            "reward_rejected": rejected_rewards.mean(),
            "logps_chosen": policy_chosen.detach().mean(),
            "logps_rejected": policy_rejected.detach().mean(),
            "num_tokens": batch["input_ids"].numel(),
        }
        if ref_chosen is not None:
            metrics["kl"] = torch.cat([policy_chosen - ref_chosen, policy_rejected - ref_rejected]).detach().mean()
        return total, metrics

    return Objective(loss=summed_loss, count=count_pairs, name=f"{cfg.loss} preference loss")


def make_preference_loss(cfg: PreferenceConfig, reference: ReferenceModel | None = None):
    """``(model, batch) -> (mean loss over the batch's pairs, metrics)``: one micro-batch's loss (evaluation,
    plain PyTorch loops); training uses ``make_preference_objective``."""
    return make_preference_objective(cfg, reference).mean


# ------------------------------------------------------------------------------------- the run
def preference_datasets(tokenizer: Any, cfg: PreferenceConfig, data: str | None = None,
                        val_data: str | None = None, per_task: int = 1200, skip_malformed: bool = False
                        ) -> tuple[list[TokenizedPair], list[TokenizedPair], dict[str, Any]]:
    """(train pairs, val pairs, info) from JSONL or, without ``data``, the embedded tasks' splits."""
    from tritium.align.data import load_preference_jsonl
    from tritium.align.tasks import make_splits, preference_pairs

    info: dict[str, Any] = {}
    if data is None:
        splits = make_splits(seed=cfg.seed, per_task=per_task)
        train_pairs = preference_pairs(splits["train"], seed=cfg.seed)
        val_pairs = preference_pairs(splits["val"], seed=cfg.seed + 1)
        info["source"] = f"embedded tasks (seed {cfg.seed}, {per_task} prompts per task)"
    else:
        train_pairs, stats = load_preference_jsonl(data, skip_malformed=skip_malformed)
        info["source"], info["read"] = str(data), stats.summary()
        if val_data is not None:
            val_pairs, _ = load_preference_jsonl(val_data, skip_malformed=skip_malformed)
        else:
            order = list(range(len(train_pairs)))
            random.Random(f"dpo-val:{cfg.seed}").shuffle(order)
            held = set(order[:max(1, len(order) // 20)] if len(order) > 1 else [])
            val_pairs = [p for i, p in enumerate(train_pairs) if i in held]
            train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
    train, dropped = tokenize_pairs(tokenizer, train_pairs, cfg.max_len)
    val, _ = tokenize_pairs(tokenizer, val_pairs, cfg.max_len, warn=False)
    info.update(train_pairs=len(train), dropped_too_long=dropped, val_pairs=len(val))
    return train, val, info


def train_preference(train_cfg: Any, cfg: PreferenceConfig, checkpoint: str, data: str | None = None,
                     val_data: str | None = None, per_task: int = 1200, skip_malformed: bool = False):
    """DPO/IPO/SimPO from ``checkpoint`` (policy init = reference) with ``tritium.train.trainer.fit``.

    ``reference="cached"``: reference log-probs of every train/val pair are computed once from
    ``checkpoint`` and stored in ``OUT/reference_logps*.pt`` (reused when the checkpoint and tokens match).
    """
    from tritium.model.tokenizer import Tokenizer
    from tritium.train.trainer import fit

    tokenizer = Tokenizer.load(checkpoint)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
    train, val, info = preference_datasets(tokenizer, cfg, data, val_data, per_task, skip_malformed)
    out = Path(train_cfg.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_ref = val_ref = None
    reference = None
    if cfg.reference == "cached":
        train_ref = cached_reference_logps(checkpoint, train, pad_id, out / "reference_logps.pt", device=device)
        if val:
            val_ref = cached_reference_logps(checkpoint, val, pad_id, out / "reference_logps_val.pt", device=device)
    elif cfg.reference == "model":
        reference = _LazyReference(checkpoint)
    source = PreferenceBatches(train, pad_id, train_cfg.micro_batch, seed=cfg.seed, reference_logps=train_ref)
    val_source = PreferenceBatches(val, pad_id, train_cfg.micro_batch, seed=cfg.seed, reference_logps=val_ref,
                                   shuffle=False) if val else None
    objective = make_preference_objective(cfg, reference)
    # validation uses the same rule: val_loss is the mean over every validation pair
    return fit(train_cfg, make_batches=source, loss_fn=objective, tokenizer=tokenizer, init_from=checkpoint,
               make_eval_batches=val_source.finite if val_source else None,
               extra_config={"preference": cfg.to_dict(), "preference_data": info, "checkpoint": str(checkpoint)})


class _LazyReference(ReferenceModel):
    """A frozen copy loaded from the checkpoint on first use, on the device of the first batch."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint, self.model = checkpoint, None

    @torch.no_grad()
    def logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.model is None:
            from tritium.model.transformer import Transformer

            super().__init__(Transformer.from_pretrained(self.checkpoint, device=batch["input_ids"].device))
        return super().logps(batch)
