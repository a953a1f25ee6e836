"""Embedded instruction tasks with programmatic verifiers: the default SFT/DPO data and the eval set.

Four tasks a 4-layer, 192-wide model can learn in a minute or two of CPU SFT: short prompts, short
answers over a small vocabulary of digits and letters, each checked by a verifier (never by a model).

* ``reverse``  -- "reverse: c a t"          -> "t a c"     (letters space-separated: one token each)
* ``add``      -- "add: 12 + 7"             -> "19"
* ``sort``     -- "sort: 5 2 8"             -> "2 5 8"
* ``python``   -- "python: max(3, 7, 1)"    -> "7"         (a short Python expression; the answer is
  computed alongside the expression, nothing is ``eval``'d)

Splits are by *prompt*: each task's pool of distinct prompts is shuffled with the seed and cut into
train/val/test, so held-out prompts were never seen in training.  The same seed gives the same splits.

Preference pairs put the verified answer (chosen) against a plausible wrong one (an off-by-one sum,
the input left unsorted, letters not reversed) or a rambling one (the right answer that does not stop).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tritium.align.data import PreferencePair

TASKS: tuple[str, ...] = ("reverse", "add", "sort", "python")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TaskExample:
    task: str  # one of TASKS
    prompt: str  # the user message
    answer: str  # the verified reply

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": self.prompt}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns

    def verify(self, reply: str) -> bool:
        """Exact match after trimming surrounding whitespace (the reply is the text before <|end|>)."""
        return reply.strip() == self.answer

    def to_json(self) -> dict[str, str]:
        return {"task": self.task, "prompt": self.prompt, "completion": self.answer}


# --------------------------------------------------------------------------------- generators
# Each draws one (prompt, answer) from rng; pools are filled by drawing until enough distinct prompts.
def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
    return "reverse: " + " ".join(letters), " ".join(reversed(letters))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 19), rng.randint(0, 19)
    return f"add: {a} + {b}", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    values = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return "sort: " + " ".join(map(str, values)), " ".join(map(str, sorted(values)))


def _python(rng: random.Random) -> tuple[str, str]:
    form = rng.randrange(5)
    if form == 0:
        values = [rng.randint(0, 9) for _ in range(3)]
        return f"python: max({', '.join(map(str, values))})", str(max(values))
    if form == 1:
        values = [rng.randint(0, 9) for _ in range(3)]
        return f"python: min({', '.join(map(str, values))})", str(min(values))
    if form == 2:
        word = "".join(rng.choice(LETTERS[:8]) for _ in range(rng.randint(1, 6)))
        return f"python: len('{word}')", str(len(word))
    if form == 3:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"python: {a} * {b}", str(a * b)
    a = rng.randint(0, 9)
    b = rng.randint(0, a)
    return f"python: {a} - {b}", str(a - b)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "add": _add, "sort": _sort, "python": _python}


def task_pool(task: str, size: int, seed: int) -> list[TaskExample]:
    """Up to ``size`` distinct-prompt examples of ``task``, in a seed-determined order."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < size and attempts < 50 * size:  # small spaces (add: 400 prompts) saturate
        prompt, answer = GENERATORS[task](rng)
        seen.setdefault(prompt, answer)
        attempts += 1
    examples = [TaskExample(task, p, a) for p, a in seen.items()]
    rng.shuffle(examples)
    return examples


def make_splits(seed: int = 0, per_task: int = 1200, tasks: Sequence[str] = TASKS,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[TaskExample]]:
    """Deterministic train/val/test splits, disjoint by prompt, mixed across tasks and shuffled."""
    if per_task < 10:
        raise ValueError(f"per_task must be >= 10 (so every split gets examples), got {per_task}")
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    splits: dict[str, list[TaskExample]] = {name: [] for name in SPLITS}
    for task in tasks:
        pool = task_pool(task, per_task, seed)
        n_train = int(len(pool) * fractions[0])
        n_val = int(len(pool) * fractions[1])
        splits["train"] += pool[:n_train]
        splits["val"] += pool[n_train:n_train + n_val]
        splits["test"] += pool[n_train + n_val:]
    for name in SPLITS:
        random.Random(f"mix:{name}:{seed}").shuffle(splits[name])
    return splits


# ------------------------------------------------------------------------------ preference pairs
def _plausible_wrong(example: TaskExample, rng: random.Random) -> str:
    """A wrong answer of the right shape (so only correctness separates it from the chosen one)."""
    answer, task = example.answer, example.task
    if task == "reverse":
        letters = example.prompt.split(": ", 1)[1].split()
        if letters != letters[::-1]:
            return " ".join(letters)  # forgot to reverse
        wrong = list(letters)
        wrong[0] = LETTERS[(LETTERS.index(wrong[0]) + 1) % 26]
        return " ".join(wrong)
    if task == "sort":
        values = example.prompt.split(": ", 1)[1].split()
        if values != sorted(values, key=int):
            return " ".join(values)  # left unsorted
        return " ".join(sorted(values, key=int, reverse=True)) if len(set(values)) > 1 \
            else " ".join(values[:-1])
    if answer.lstrip("-").isdigit():
        delta = rng.choice((-1, 1, 2)) if int(answer) > 0 else rng.choice((1, 2))
        return str(int(answer) + delta)  # off by a little, usually the same length
    return answer[::-1] if answer[::-1] != answer else answer + answer[-1]


def _rambling(example: TaskExample, rng: random.Random) -> str:
    """The right answer that does not stop: repeats itself and trails off."""
    filler = rng.choice(["and so on", "or maybe not", "let me think again", "and then more"])
    return f"{example.answer} {example.answer} {filler}"


def preference_pairs(examples: Sequence[TaskExample], seed: int = 0, rambling_fraction: float = 0.25
                     ) -> list[PreferencePair]:
    """One pair per example: chosen = verified answer, rejected = plausible wrong (or rambling)."""
    rng = random.Random(f"pairs:{seed}")
    pairs = []
    for example in examples:
        rejected = _rambling(example, rng) if rng.random() < rambling_fraction else _plausible_wrong(example, rng)
        assert not example.verify(rejected), (example, rejected)
        pairs.append(PreferencePair(example.messages(with_answer=False), example.answer, rejected))
    return pairs


def sft_conversations(examples: Sequence[TaskExample]) -> list[list[dict[str, str]]]:
    return [example.messages() for example in examples]

