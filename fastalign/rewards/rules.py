"""Format and length rule rewards: R1's think format reward and DAPO's soft overlong punishment."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastalign.rewards.base import completion_texts

_THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>(.*)$", re.DOTALL)


def think_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when a completion is ``<think>reasoning</think>`` followed by an answer, else 0.0 (R1's format reward).

    TRL's regex semantics (``^<think>(?!.*<think>)(.*?)</think>.*$`` with DOTALL): the completion starts with
    ``<think>`` (no leading text or whitespace) and has no second ``<think>``; the block ends at the first
    ``</think>``. fastalign adds what the R1 format asks for and TRL's regex lets through: the text after
    ``</think>`` must be a non-empty answer (not only whitespace) and contain no further ``</think>``.

    Args:
        completions: strings or conversational completions (lists of messages).
    """
    rewards = []
    for text in completion_texts(completions):
        m = _THINK.match(text)
        ok = m is not None and m.group(2).strip() != "" and "</think>" not in m.group(2)
        rewards.append(1.0 if ok else 0.0)
    return rewards


class SoftOverlongPunishment:
    r"""DAPO's soft overlong punishment (Eq. 13) on the number of completion tokens ``L = len(completion_ids)``:

    ``0`` for ``L <= L_max - L_cache``; ``((L_max - L_cache) - L) / L_cache`` (linear from 0 down to -1) for
    ``L_max - L_cache < L <= L_max``; ``-1`` for ``L > L_max``. With ``L_cache = 0`` it is 0 up to ``L_max`` and
    -1 beyond. A callable class rather than a closure, so it pickles (process-based rollout workers).
    """

    def __init__(self, max_completion_length: int, soft_punish_cache: int) -> None:
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be positive, got {max_completion_length}")
        if not 0 <= soft_punish_cache <= max_completion_length:
            raise ValueError(
                f"soft_punish_cache must be in [0, max_completion_length={max_completion_length}], "
                f"got {soft_punish_cache}"
            )
        self.max_completion_length = int(max_completion_length)
        self.soft_punish_cache = int(soft_punish_cache)
        self.__name__ = self.name = "soft_overlong_punishment"

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        l_max, cache = self.max_completion_length, self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= l_max - cache:
                rewards.append(0.0)
            elif length <= l_max:
                rewards.append(((l_max - cache) - length) / cache)
            else:
                rewards.append(-1.0)
        return rewards

    def __repr__(self) -> str:
        return f"SoftOverlongPunishment({self.max_completion_length}, {self.soft_punish_cache})"


def soft_overlong_punishment(max_completion_length: int, soft_punish_cache: int) -> SoftOverlongPunishment:
    """A reward function applying DAPO's soft overlong punishment (see :class:`SoftOverlongPunishment`)."""
    return SoftOverlongPunishment(max_completion_length, soft_punish_cache)
