"""The demo's synthetic task: addition of whole numbers with a worked, column-by-column chain of thought.

Everything the R1 recipe needs is generated here, from one seeded split of the problems so that the held-out
problems appear in no training file (not even the pre-training text):

* ``pretrain.jsonl`` — ``text`` rows, a base model's corpus: worked sums in its own notation
  (``Q:347+068=[steps]=415``, the steps without R1's tags), the one-digit sums a step uses, numbers and their
  successors (``N:347=348``);
* ``cot.jsonl`` — the cold start: ``prompt`` / ``completion`` rows with ``<think>`` reasoning (a few hundred);
* ``prompts.jsonl`` — the RL prompts: ``prompt`` / ``solution`` rows (``solution`` is the gold answer);
* ``general.jsonl`` — non-reasoning ``prompt`` / ``completion`` rows (the successor of a number, answered in one of
  two :data:`STYLES`, half each);
* ``final_prompts.jsonl`` — the final RL stage's prompts: the RL prompts and the general ones (no ``solution``:
  only the reward model scores them, as R1 does for general data);
* ``preferences.jsonl`` — ``prompt`` / ``chosen`` / ``rejected`` rows for the reward model: a worked solution vs
  the same one with a mistake or a broken format, and a general answer in the ``short`` style vs the ``full`` one
  (a preference no rule reward encodes);
* ``heldout.jsonl`` / ``heldout_general.jsonl`` — problems and general prompts never trained on, for evaluation,
  and ``heldout_preferences.jsonl`` — pairs built from them, for the reward model's evaluation.

A problem is ``Q:347+068=`` (operands zero-padded to three digits); its completion works the columns from the
right, each as ``a+b+carry=sum`` with a two-digit sum followed by the answer's digits so far, then gives the
answer::

    <think>7+8+0=15>5,4+6+1=11>15,3+0+1=04>415</think><answer>415</answer>

The tokenizer reads one character per token (tags like ``<think>`` are single tokens), so a column's digits are
single tokens and decoding gives the exact text back.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
CHARACTERS = (*"0123456789", "+", "=", ",", ">", "[", "]", "Q", "N", ":")
WIDTH = 3
"""Digits per operand: problems go up to 999 + 999."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer for the task: specials, the four tags and the characters of the task.

    Encoding adds ``<s>`` in front (``add_special_tokens=True``); decoding concatenates the pieces (no spaces).
    """
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *TAGS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A tag is one piece, anything else one character per piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("<[^<>]+>|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def prompt(a: int, b: int) -> str:
    """The question, operands zero-padded to :data:`WIDTH` digits so that a column's digits sit at fixed places."""
    return f"Q:{a:0{WIDTH}d}+{b:0{WIDTH}d}="


def _columns(a: int, b: int, zero_carries: bool = True) -> tuple[list[str], str]:
    """The worked columns, least significant first, each ``x+y+carry=ss>digits so far`` (``+0`` left out when not
    ``zero_carries``), and the answer: the digits so far with the last carry in front (it may keep leading zeros:
    ``093`` is 93)."""
    steps, carry, digits = [], 0, ""
    for column in range(WIDTH):
        x, y = a // 10**column % 10, b // 10**column % 10
        total = x + y + carry
        digits = str(total % 10) + digits
        added = f"+{carry}" if carry or zero_carries else ""
        steps.append(f"{x}+{y}{added}={total:02d}>{digits}")
        carry = total // 10
    return steps, ("1" if carry else "") + digits


def reasoning(a: int, b: int, zero_carries: bool = True) -> str:
    """The ``<think>`` block: one step per column, each adding its digit in front of the digits so far (so the
    answer is a copy of the last step's digits, not a reversal). Without ``zero_carries`` a column with no carry
    coming in is written ``7+8=15>5`` instead of ``7+8+0=15>5``."""
    return "<think>" + ",".join(_columns(a, b, zero_carries)[0]) + "</think>"


def completion(a: int, b: int, zero_carries: bool = True) -> str:
    return f"{reasoning(a, b, zero_carries)}<answer>{_columns(a, b, zero_carries)[1]}</answer>"


def general_prompt(n: int) -> str:
    return f"N:{n}="


STYLES = ("short", "full")
"""The two ways a general answer is written: ``short`` gives the number (``<answer>348</answer>``), ``full``
restates the question first (``<answer>347+1=348</answer>``). Both are right; the preference pairs prefer
``short`` (brevity), which no rule reward scores, so only the reward model can teach it."""


def general_completion(n: int, style: str = "short") -> str:
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {STYLES}")
    return f"<answer>{n + 1}</answer>" if style == "short" else f"<answer>{n}+1={n + 1}</answer>"


def general_style(text: str) -> str | None:
    """``short`` or ``full`` for a general answer written in that style (right or wrong), else ``None``."""
    if re.fullmatch(r"<answer>\d+</answer>", text):
        return "short"
    if re.fullmatch(r"<answer>\d+\+1=\d+</answer>", text):
        return "full"
    return None


@dataclass(frozen=True)
class TaskSizes:
    """How many problems each file gets (the splits are disjoint)."""

    heldout: int = 300
    cot: int = 200
    prompts: int = 1000
    preferences: int = 1000
    pretrain_worked: int = 10000
    general: int = 300
    heldout_general: int = 100
    max_value: int = 999


def _corrupt(rng: random.Random, a: int, b: int) -> str:
    """A plausible wrong completion: a wrong answer after the right reasoning, a slip in one column, or the answer
    without the reasoning."""
    kind = rng.randrange(3)
    if kind == 0:
        offset = rng.choice([-100, -10, -1, 1, 10, 100])
        wrong = a + b + offset if a + b + offset >= 0 else a + b - offset
        return f"{reasoning(a, b)}<answer>{wrong}</answer>"
    if kind == 1:
        text = completion(a, b)
        digits = [i for i, ch in enumerate(text) if ch.isdigit()]
        i = rng.choice(digits)
        return text[:i] + str((int(text[i]) + rng.randrange(1, 10)) % 10) + text[i + 1 :]
    return f"<answer>{a + b}</answer>"


def _pairs(rng: random.Random, max_value: int, seen: set[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Problems not in ``seen`` (which grows), the number of digits of each operand uniform in 1..len(max_value)."""
    digits = len(str(max_value))

    def operand() -> int:
        width = rng.randint(1, digits)
        return rng.randint(0 if width == 1 else 10 ** (width - 1), min(max_value, 10**width - 1))

    while True:
        pair = (operand(), operand())
        if pair not in seen:
            seen.add(pair)
            yield pair


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_task(folder: str | Path, sizes: TaskSizes = TaskSizes(), seed: int = 0) -> dict[str, Path]:
    """Writes the task's JSONL files into ``folder``; returns their paths by name (``pretrain``, ``cot``, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems = _pairs(rng, sizes.max_value, seen)

    def take(n: int) -> list[tuple[int, int]]:
        return [next(problems) for _ in range(n)]

    heldout, cot, rl = take(sizes.heldout), take(sizes.cot), take(sizes.prompts)
    preferences, worked_problems = take(sizes.preferences), take(sizes.pretrain_worked)
    numbers = rng.sample(range(sizes.max_value + 1), sizes.heldout_general + 2 * sizes.general)
    heldout_numbers = numbers[: sizes.heldout_general]
    general, general_pairs = numbers[sizes.heldout_general :: 2], numbers[sizes.heldout_general + 1 :: 2]
    # Pre-training text is a base model's corpus: worked sums in its own notation, ``Q:...=[steps]=answer`` (the
    # base can add, but has never seen the format the recipe asks for), the one-digit sums a step uses, and the
    # numbers with their successors (but those of the held-out general prompts).
    # Both in pre-training and in the cold start a worked solution writes "+0" or leaves it out, at random: two
    # ways to the same answer make the move to the new format partial and noisy rather than all or nothing (with
    # one way, 4 cold-start epochs gave 0.12 held-out accuracy and 5 gave 0.93), which leaves RL something to do.
    worked = [
        prompt(a, b) + f"[{','.join(steps)}]={answer}"
        for a, b in worked_problems
        for steps, answer in [_columns(a, b, rng.random() < 0.5)]
    ]
    digit_facts = [f"{x}+{y}+{c}={x + y + c:02d}" for x in range(10) for y in range(10) for c in (0, 1)]
    unseen = set(heldout_numbers)
    counting = [f"{general_prompt(n)}{n + 1}" for n in range(sizes.max_value + 1) if n not in unseen]
    pretrain = worked + digit_facts * 5 + counting
    rng.shuffle(pretrain)
    general_rows = [
        {"prompt": general_prompt(n), "completion": general_completion(n, rng.choice(STYLES))} for n in general
    ]

    def style_pair(n: int) -> dict[str, str]:
        return {
            "prompt": general_prompt(n),
            "chosen": general_completion(n, "short"),
            "rejected": general_completion(n, "full"),
        }

    files = {
        "pretrain": [{"text": text} for text in pretrain],
        "cot": [{"prompt": prompt(a, b), "completion": completion(a, b, rng.random() < 0.5)} for a, b in cot],
        "prompts": [{"prompt": prompt(a, b), "solution": str(a + b)} for a, b in rl],
        "general": general_rows,
        "final_prompts": [{"prompt": prompt(a, b), "solution": str(a + b)} for a, b in rl]
        + [{"prompt": row["prompt"]} for row in general_rows],
        "preferences": [
            {"prompt": prompt(a, b), "chosen": completion(a, b), "rejected": _corrupt(rng, a, b)}
            for a, b in preferences
        ]
        + [style_pair(n) for n in general_pairs],
        "heldout": [{"prompt": prompt(a, b), "solution": str(a + b)} for a, b in heldout],
        "heldout_general": [{"prompt": general_prompt(n)} for n in heldout_numbers],
        "heldout_preferences": [
            {"prompt": prompt(a, b), "chosen": completion(a, b), "rejected": _corrupt(rng, a, b)} for a, b in heldout
        ]
        + [style_pair(n) for n in heldout_numbers],
    }
    return {name: _write(folder / f"{name}.jsonl", rows) for name, rows in files.items()}
