"""DAPO's dynamic sampling: a generation batch keeps only the groups whose rewards differ (a group of equal
rewards has zero advantage and teaches nothing) and is filled up again with the groups of more prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastalign.trainers.online import Rollout


def dynamic_sampling(
    rollout: Rollout,
    more: Callable[[int], Rollout],
    *,
    group: int,
    max_resample_rounds: int,
    pad_token_id: int,
    metrics: dict[str, list],
) -> Rollout:
    """``rollout``'s groups (of ``group`` completions) whose rewards differ, then those of ``more(prompts)``
    (a rollout of that many new prompts) for up to ``max_resample_rounds`` rounds, until there are as many as
    ``rollout`` had; the places still open are filled with the dropped groups. Appends the
    ``dynamic_sampling/*`` metrics to ``metrics``."""
    needed = len(rollout) // group
    kept: list[Rollout] = []
    dropped: list[Rollout] = []
    pending = rollout
    for round_ in range(max_resample_rounds + 1):
        for start in range(0, len(pending), group):
            part = pending.select(slice(start, start + group))
            (kept if part.rewards.std() > 0 else dropped).append(part)
        if len(kept) >= needed or round_ == max_resample_rounds:
            break  # (no refill after the last round: it would be sampled and never looked at)
        pending = more(needed - len(kept))
        metrics["dynamic_sampling/resampled_prompts"].append(float(needed - len(kept)))
    metrics["dynamic_sampling/kept_groups"].append(float(min(len(kept), needed)))
    chosen = (kept + dropped)[:needed]
    return chosen[0].concat(chosen[1:], pad_token_id)


def endless_rows(dataset: Any, seed: int) -> Iterator[dict]:
    """The dataset's rows in a new seeded shuffle each pass, without end (the prompts dynamic sampling adds)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(dataset), generator=generator).tolist():
            yield dataset[index]
