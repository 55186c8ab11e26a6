"""Reward functions for RL on rule-rewarded data (DeepSeek-R1 / GRPO) and reward-model scoring.

The contract is TRL's: a reward function is called as ``f(prompts=..., completions=..., completion_ids=...,
**columns)`` (every other dataset column passed as a list aligned with the completions) and returns one
``float`` or ``None`` (not applicable) per completion. :func:`score` calls several and combines them with a
weighted NaN-aware sum.

Built-ins: :func:`accuracy_reward` (math answers against the ``solution`` column), :func:`think_format_reward`,
:func:`soft_overlong_punishment` (DAPO), :data:`code_reward` / :class:`CodeReward` (Python tests in a bubblewrap
sandbox, judged by the trainer) and :class:`RewardModelFunction` (a Bradley-Terry reward model as a reward function).
"""

from fastalign.rewards.accuracy import (
    accuracy_reward,
    answers_equal,
    extract_answer,
    extract_gold,
    is_equivalent,
    parse_answer,
)
from fastalign.rewards.base import (
    RewardFunction,
    RewardModelFunction,
    completion_text,
    completion_texts,
    is_conversational_value,
    reward_function_name,
    score,
)
from fastalign.rewards.code_execution import CodeReward, code_reward, extract_code, unsandboxed_code_reward
from fastalign.rewards.resolve import load_reward_function, resolve_reward_funcs, resolve_reward_weights
from fastalign.rewards.rules import SoftOverlongPunishment, soft_overlong_punishment, think_format_reward
from fastalign.rewards.sandbox import SandboxUnavailableError

__all__ = [
    "CodeReward",
    "RewardFunction",
    "RewardModelFunction",
    "SandboxUnavailableError",
    "SoftOverlongPunishment",
    "accuracy_reward",
    "answers_equal",
    "code_reward",
    "completion_text",
    "completion_texts",
    "extract_answer",
    "extract_code",
    "extract_gold",
    "is_conversational_value",
    "is_equivalent",
    "load_reward_function",
    "parse_answer",
    "resolve_reward_funcs",
    "resolve_reward_weights",
    "reward_function_name",
    "score",
    "soft_overlong_punishment",
    "think_format_reward",
    "unsandboxed_code_reward",
]
