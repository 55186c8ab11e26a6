"""Packing and collators: tokenized examples → token batches.

Label convention (Hugging Face's): ``labels`` are aligned with ``input_ids`` (not shifted); the trainer predicts
``labels[:, t + 1]`` from position ``t``. ``IGNORE_INDEX`` (-100) marks tokens without loss: prompt, padding,
and, in packed / padding-free rows, the first token of every document (so no document's last position is
trained to predict the next document's first token).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastalign._padding import pad_rows as _pad

IGNORE_INDEX = -100


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _doc_labels(input_ids: Sequence[int], completion_mask: Sequence[int] | None) -> list[int]:
    """Labels of one document: its ids where ``completion_mask`` is 1 (all when None), else -100."""
    if completion_mask is None:
        return list(input_ids)
    if len(completion_mask) != len(input_ids):
        raise ValueError(f"completion_mask has {len(completion_mask)} entries for {len(input_ids)} input_ids")
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, completion_mask, strict=True)]


def pack_sequences(
    tokenized: Sequence[Mapping[str, Any]],
    max_length: int,
    *,
    strategy: str = "bfd",
    overflow: str = "truncate",
) -> list[dict[str, list[int]]]:
    """Pack tokenized examples into rows of at most ``max_length`` tokens, whole examples only.

    Args:
        tokenized: dicts with ``input_ids`` and optionally ``completion_mask`` (1 on tokens with loss; all tokens
            when absent), e.g. the output of :func:`~fastalign.data.tokenization.tokenize_sft`.
        max_length: the row length limit.
        strategy: ``"bfd"`` (best-fit decreasing: longest first, each into the fullest row it fits in; fewest
            rows) or ``"greedy"`` (in the given order, a new row when the next example does not fit).
        overflow: what happens to an example longer than ``max_length``: ``"truncate"`` keeps its first
            ``max_length`` tokens (TRL's BFD packing does the same); ``"split"`` cuts it into ``max_length``-token
            pieces, each packed as a separate document (each piece's first token then carries no loss).

    Returns:
        one dict per row: ``input_ids``, ``labels`` (-100 off the completion and at each document's first
        token), ``position_ids`` (restarting at 0 per document: padding-free batches for flash attention's
        varlen path) and ``seq_lengths`` (the documents' lengths), all ``list[int]``; row lengths ≤ ``max_length``
        and the document lengths sum to the row length. Empty examples are dropped.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if strategy not in ("bfd", "greedy"):
        raise ValueError(f"strategy must be 'bfd' or 'greedy', got {strategy!r}")
    if overflow not in ("truncate", "split"):
        raise ValueError(f"overflow must be 'truncate' or 'split', got {overflow!r}")
    docs: list[tuple[list[int], list[int]]] = []  # (input_ids, labels) of each document
    for example in tokenized:
        ids = list(example["input_ids"])
        labels = _doc_labels(ids, example.get("completion_mask"))
        starts = range(0, len(ids), max_length) if overflow == "split" else range(0, min(len(ids), 1))
        for s in starts:
            docs.append((ids[s : s + max_length], labels[s : s + max_length]))

    bins: list[list[int]] = []  # document indices of each row
    if strategy == "greedy":
        used = max_length
        for i, (ids, _) in enumerate(docs):
            if used + len(ids) > max_length:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += len(ids)
    else:
        free: list[tuple[int, int]] = []  # (room left, row index), sorted: the best fit is the first with room ≥ n
        for i in sorted(range(len(docs)), key=lambda i: -len(docs[i][0])):
            n = len(docs[i][0])
            at = bisect.bisect_left(free, (n, -1))
            if at < len(free):
                room, row = free.pop(at)
            else:
                room, row = max_length, len(bins)
                bins.append([])
            bins[row].append(i)
            bisect.insort(free, (room - n, row))

    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
        for i in members:
            ids, labels = docs[i]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX, *labels[1:]]
            row["position_ids"] += list(range(len(ids)))
            row["seq_lengths"].append(len(ids))
        rows.append(row)
    return rows


@dataclass
class SFTCollator:
    """Batch SFT examples.

    Each example has ``input_ids`` and either ``completion_mask`` (from
    :func:`~fastalign.data.tokenization.tokenize_sft`; loss on all tokens when absent) or ready ``labels``
    (from :func:`pack_sequences`), and optionally ``position_ids`` (packed rows).

    * padded (default): ``input_ids`` ``[B, T]`` right-padded with ``pad_token_id``, ``attention_mask`` ``[B, T]``
      (1 on real tokens), ``labels`` ``[B, T]`` (-100 off the completion and on padding), and ``position_ids``
      ``[B, T]`` (0 on padding) when the examples carry them. ``T`` is the longest example, rounded up to
      ``pad_to_multiple_of``. Packed rows in a padded batch need an attention that reads ``position_ids``
      (flash attention varlen); a plain ``attention_mask`` lets packed documents see each other.
    * ``padding_free=True``: all examples concatenated into one row: ``input_ids``, ``labels``, ``position_ids``
      ``[1, N]`` (``N`` = total tokens), positions restarting at 0 per document and the first label of every
      document -100; no ``attention_mask`` (flash attention's varlen path finds the documents from
      ``position_ids``).

    All tensors are ``torch.long``.
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("SFTCollator needs a pad_token_id (set tokenizer.pad_token, e.g. to the EOS token)")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        ids = [list(e["input_ids"]) for e in examples]
        labels = [
            list(e["labels"]) if "labels" in e else _doc_labels(i, e.get("completion_mask"))
            for i, e in zip(ids, examples, strict=True)
        ]
        has_positions = all("position_ids" in e for e in examples)
        if has_positions:
            positions = [list(e["position_ids"]) for e in examples]
        else:
            positions = [list(range(len(row))) for row in ids]
        if self.padding_free:
            flat_ids = [t for row in ids for t in row]
            flat_pos = [p for row in positions for p in row]
            flat_labels = [
                IGNORE_INDEX if p == 0 else lab
                for row_l, row_p in zip(labels, positions, strict=True)
                for lab, p in zip(row_l, row_p, strict=True)
            ]
            return {
                "input_ids": torch.tensor([flat_ids], dtype=torch.long),
                "labels": torch.tensor([flat_labels], dtype=torch.long),
                "position_ids": torch.tensor([flat_pos], dtype=torch.long),
            }
        width = _round_up(max(len(r) for r in ids), self.pad_to_multiple_of)
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, width),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0, width),
            "labels": _pad(labels, IGNORE_INDEX, width),
        }
        if has_positions:
            batch["position_ids"] = _pad(positions, 0, width)
        return batch


def _pair_rows(examples: Sequence[Mapping[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
    """Rows ``prompt + chosen`` for every pair, then ``prompt + rejected``; and their completion masks."""
    rows, masks = [], []
    for column in ("chosen_ids", "rejected_ids"):
        for e in examples:
            prompt, completion = list(e.get("prompt_ids") or []), list(e[column])
            rows.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
    return rows, masks


def _margins(examples: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    if all(e.get("margin") is not None for e in examples):
        return torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)
    return None


@dataclass
class PreferenceCollator:
    """Batch preference pairs for DPO: ``B`` examples with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    (from :func:`~fastalign.data.tokenization.tokenize_preference`) → ``2B`` rows, **chosen rows first** (rows
    ``0..B-1`` are ``prompt + chosen``, rows ``B..2B-1`` are ``prompt + rejected`` of the same pairs).

    Returns:
        ``input_ids`` ``[2B, T]`` right-padded with ``pad_token_id``; ``attention_mask`` ``[2B, T]``;
        ``completion_mask`` ``[2B, T]`` (1 on completion tokens); ``labels`` ``[2B, T]`` (the completion ids,
        -100 on prompt and padding), all ``torch.long``; and ``margin`` ``[B]`` float32 when every example has
        one. ``T`` is the longest row, rounded up to ``pad_to_multiple_of``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError(f"{type(self).__name__} needs a pad_token_id (set tokenizer.pad_token)")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows, masks = _pair_rows(examples)
        width = _round_up(max(len(r) for r in rows), self.pad_to_multiple_of)
        labels = [_doc_labels(r, k) for r, k in zip(rows, masks, strict=True)]
        batch = {
            "input_ids": _pad(rows, self.pad_token_id, width),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, width),
            "completion_mask": _pad(masks, 0, width),
            "labels": _pad(labels, IGNORE_INDEX, width),
        }
        margin = _margins(examples)
        if margin is not None:
            batch["margin"] = margin
        return batch


@dataclass
class RewardCollator(PreferenceCollator):
    """Batch preference pairs for a Bradley-Terry reward model: ``2B`` rows, chosen rows first, each the full
    ``prompt + completion`` sequence (``prompt_ids`` optional).

    Returns:
        ``input_ids`` ``[2B, T]`` right-padded with ``pad_token_id`` and ``attention_mask`` ``[2B, T]``
        (``torch.long``; the reward is read at each row's last real token, index ``attention_mask.sum(-1) - 1``),
        and ``margin`` ``[B]`` float32 when every example has one.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        del batch["completion_mask"], batch["labels"]
        return batch
