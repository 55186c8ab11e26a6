"""Dataset formats (TRL 1.x naming), their detection, and checks that a dataset fits a trainer.

=====================  ==========================================  ==========================================
format                 columns                                     standard / conversational
=====================  ==========================================  ==========================================
``language_modeling``  ``text``                                    standard only
``conversational_lm``  ``messages``                                conversational only
``prompt_completion``  ``prompt``, ``completion``                  both
``preference``         ``chosen``, ``rejected`` (``prompt``        both; without ``prompt`` the prompt is the
                       optional)                                   shared prefix of chosen and rejected
``prompt_only``        ``prompt``                                  both
=====================  ==========================================  ==========================================

A conversational value is a list of ``{"role": ..., "content": ...}`` messages; a standard value is a string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets

from fastalign.data.values import check_values

LANGUAGE_MODELING = "language_modeling"
CONVERSATIONAL_LM = "conversational_lm"
PROMPT_COMPLETION = "prompt_completion"
PREFERENCE = "preference"
PROMPT_ONLY = "prompt_only"

# Required columns of each format (``preference`` also takes an optional ``prompt``).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    LANGUAGE_MODELING: ("text",),
    CONVERSATIONAL_LM: ("messages",),
    PROMPT_COMPLETION: ("prompt", "completion"),
    PREFERENCE: ("chosen", "rejected"),
    PROMPT_ONLY: ("prompt",),
}
FORMATS = tuple(FORMAT_COLUMNS)
DETECTION_ORDER = (PREFERENCE, PROMPT_COMPLETION, CONVERSATIONAL_LM, LANGUAGE_MODELING, PROMPT_ONLY)

# Formats each trainer reads. RL trainers read the ``prompt`` column of any format that has one (other columns
# go to the reward functions).
TRAINER_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": (PROMPT_COMPLETION, CONVERSATIONAL_LM, LANGUAGE_MODELING),
    "reward": (PREFERENCE,),
    "dpo": (PREFERENCE,),
    "rl": (PROMPT_ONLY,),
    "grpo": (PROMPT_ONLY,),
    "ppo": (PROMPT_ONLY,),
    "distill": (PROMPT_COMPLETION, PROMPT_ONLY),
}

_CONVERSATIONAL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


def _columns(dataset_or_columns: Any) -> list[str]:
    if isinstance(dataset_or_columns, datasets.DatasetDict | datasets.IterableDatasetDict):
        raise TypeError("pass one split of the dataset (a Dataset), not a DatasetDict")
    if isinstance(dataset_or_columns, datasets.Dataset | datasets.IterableDataset):
        columns = dataset_or_columns.column_names
        if columns is None:  # an IterableDataset with unknown features: look at its first row
            columns = list(next(iter(dataset_or_columns)).keys())
        return list(columns)
    if isinstance(dataset_or_columns, str):
        return [dataset_or_columns]
    if isinstance(dataset_or_columns, Mapping | Iterable):
        return [str(c) for c in dataset_or_columns]
    raise TypeError(f"expected a Dataset, an example dict or a list of column names, got {type(dataset_or_columns)}")


def _describe(fmt: str) -> str:
    cols = ", ".join(repr(c) for c in FORMAT_COLUMNS[fmt])
    return f"{fmt} ({cols}{', optional ' + repr('prompt') if fmt == PREFERENCE else ''})"


def detect_format(dataset_or_columns: Any) -> str:
    """The format of a dataset, an example dict, or a list of column names.

    The first format whose columns are all present, in the order of :data:`DETECTION_ORDER`: ``preference``,
    ``prompt_completion``, ``conversational_lm``, ``language_modeling``, ``prompt_only`` (so a dataset with
    ``prompt``, ``chosen`` and ``rejected`` is ``preference``). Extra columns are allowed.

    Raises:
        ValueError: none fits; the message lists the columns found and the formats expected.
    """
    columns = set(_columns(dataset_or_columns))
    for fmt in DETECTION_ORDER:
        if set(FORMAT_COLUMNS[fmt]) <= columns:
            return fmt
    expected = "; ".join(_describe(f) for f in FORMATS)
    raise ValueError(f"cannot tell the dataset format from columns {sorted(columns)}; expected one of: {expected}")


def require_format(dataset_or_columns: Any, trainer: str) -> str:
    """Check that a dataset fits ``trainer`` (``"sft"``, ``"reward"``, ``"dpo"``, ``"rl"``, ``"grpo"``, ``"ppo"``,
    ``"distill"``)
    and return its format.

    RL trainers accept any dataset with a ``prompt`` column (and return ``"prompt_only"``).

    A ``datasets.Dataset``'s values are checked too (:func:`~fastalign.data.values.check_values`: a number or
    null where text is expected, an int in ``tests`` ...).

    Raises:
        ValueError: the message names the missing column(s), the columns found and the formats the trainer
            reads; or the row, the column and what was expected.
    """
    if trainer not in TRAINER_FORMATS:
        raise ValueError(f"unknown trainer {trainer!r}; expected one of {sorted(TRAINER_FORMATS)}")
    columns = _columns(dataset_or_columns)
    accepted = TRAINER_FORMATS[trainer]
    found = set(columns)
    for fmt in accepted:  # listed in detection order
        if set(FORMAT_COLUMNS[fmt]) <= found:
            check_values(dataset_or_columns)
            return fmt
    # The closest accepted format: fewest missing columns.
    missing_by_format = {fmt: [c for c in FORMAT_COLUMNS[fmt] if c not in found] for fmt in accepted}
    closest = min(accepted, key=lambda fmt: len(missing_by_format[fmt]))
    missing = missing_by_format[closest]
    expected = "; ".join(_describe(f) for f in accepted)
    what = f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)}"
    raise ValueError(
        f"the {trainer} trainer cannot read this dataset: {what} (columns found: {sorted(found)}). "
        f"Expected format{'s' if len(accepted) > 1 else ''}: {expected}."
    )


def is_conversational(example: Mapping[str, Any]) -> bool:
    """Whether an example is conversational: its first column among ``prompt``, ``chosen``, ``rejected``,
    ``completion``, ``messages`` holds a list of dicts with ``role`` and ``content`` (as TRL)."""
    for key in _CONVERSATIONAL_KEYS:
        if key in example:
            value = example[key]
            return (
                isinstance(value, list)
                and len(value) > 0
                and isinstance(value[0], Mapping)
                and "role" in value[0]
                and "content" in value[0]
            )
    return False


def extract_prompt(example: Mapping[str, Any]) -> dict[str, Any]:
    """Split the longest shared prefix of ``chosen`` and ``rejected`` off as the ``prompt`` (TRL's
    ``extract_prompt``). Works on strings (a space just before the split goes with the completions) and on
    message lists (the prefix ends at a message boundary)."""
    chosen, rejected = example["chosen"], example["rejected"]
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    else:
        idx = min(len(chosen), len(rejected))
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def maybe_extract_prompt(example: Mapping[str, Any]) -> dict[str, Any]:
    """``example`` with an explicit ``prompt``: unchanged when it has one of the same kind (standard or
    conversational) as ``chosen``; otherwise the prompt is extracted from ``chosen``/``rejected`` (TRL's
    ``maybe_extract_prompt``). Other columns are kept."""
    out = dict(example)
    if "chosen" not in example or "rejected" not in example:
        return out
    if "prompt" in example and example["prompt"] is not None:
        chosen_conv = is_conversational({"chosen": example["chosen"]})
        prompt_conv = is_conversational({"prompt": example["prompt"]})
        if chosen_conv == prompt_conv:
            return out
    out.update(extract_prompt(example))
    return out
