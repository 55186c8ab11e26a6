"""One way from what a user names as rewards to the reward functions and weights a trainer calls.

:func:`resolve_reward_funcs` takes what ``GRPOTrainer`` / ``PPOTrainer`` / :func:`fastalign.sampling.rejection_sample`
and ``fastalign``'s ``--reward_funcs`` accept, one item or a list of them:

- a built-in name (:data:`BUILTIN_REWARDS`; ``soft_overlong_punishment`` is built for ``max_completion_length``
  and ``soft_punish_cache``; a sandboxed ``code_reward`` checks its sandbox here, before any model loads);
- ``module.path:function`` or TRL's ``module.path.function`` (the current folder importable);
- a reward model's local folder or hub id ``owner/name`` (a ``num_labels=1`` sequence classifier, scored through
  :class:`~fastalign.rewards.RewardModelFunction` with its own tokenizer, else the one given);
- a reward model (``torch.nn.Module``), or any other callable (TRL's reward-function contract).

Each mistake has one exception type, and its message names the argument: ``TypeError`` for an item of the wrong
type (or weights that are not a list), ``ValueError`` for everything else (no reward, an unknown name, a spec that
cannot be imported, a weight count that does not match, a weight that is not a finite number: ops'
``check_number``), :class:`~fastalign.rewards.SandboxUnavailableError` for ``code_reward`` without a working
sandbox.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fastalign.ops._checks import check_number
from fastalign.rewards.accuracy import accuracy_reward
from fastalign.rewards.base import RewardFunction, RewardModelFunction
from fastalign.rewards.code_execution import CodeReward, code_reward, unsandboxed_code_reward
from fastalign.rewards.rules import soft_overlong_punishment, think_format_reward
from fastalign.rewards.sandbox import SandboxUnavailableError

__all__ = ["BUILTIN_REWARDS", "load_reward_function", "resolve_reward_funcs", "resolve_reward_weights"]

BUILTIN_REWARDS = (
    "accuracy_reward",
    "think_format_reward",
    "code_reward",
    "unsandboxed_code_reward",
    "soft_overlong_punishment",
)
"""The reward functions known by name (TRL's ``get_soft_overlong_punishment`` is an alias of
``soft_overlong_punishment``)."""

_BY_NAME = {
    "accuracy_reward": accuracy_reward,
    "think_format_reward": think_format_reward,
    "code_reward": code_reward,
    "unsandboxed_code_reward": unsandboxed_code_reward,
}
_SOFT_OVERLONG = ("soft_overlong_punishment", "get_soft_overlong_punishment")


def resolve_reward_funcs(
    reward_funcs: Any,
    reward_weights: Sequence[float] | None = None,
    *,
    reward_model: str | torch.nn.Module | None = None,
    tokenizer: Any = None,
    max_completion_length: int | None = None,
    soft_punish_cache: int | None = None,
    load_models: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[list[RewardFunction], list[float]]:
    """The reward functions and their weights, checked.

    Args:
        reward_funcs: one item or a list of them (see the module docstring); ``None`` is no item.
        reward_weights: one weight per reward function (the reward model first when ``reward_model`` is given);
            ``None``: 1 each.
        reward_model: a reward model's path or hub id (any string: it is never read as a name) or the model,
            put before ``reward_funcs`` (``--reward_model_name_or_path``, PPO's ``reward_model_path``).
        tokenizer: wraps reward models given as modules, and those loaded from a folder without a tokenizer.
        max_completion_length / soft_punish_cache: DAPO's ``L_max`` / ``L_cache`` for ``soft_overlong_punishment``.
        load_models: ``False`` checks everything but loads no reward model: each is left in the list as given.
        device / dtype / trust_remote_code: for the reward models loaded from a path.

    Returns:
        ``(functions, weights)``: the callables in order (``RewardModelFunction`` for the reward models) and
        ``weights`` as floats, one per function.

    Raises:
        TypeError, ValueError, SandboxUnavailableError: see the module docstring.
    """
    if reward_funcs is None:
        items = []
    elif isinstance(reward_funcs, (list, tuple)):
        items = list(reward_funcs)
    else:
        items = [reward_funcs]
    model_kwargs = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    functions = []
    for index, item in enumerate(items):
        where = f"reward_funcs[{index}]" if isinstance(reward_funcs, (list, tuple)) else "reward_funcs"
        if isinstance(item, str):
            item = _from_string(item, where, max_completion_length, soft_punish_cache)
            if isinstance(item, _ModelPath):
                item = load_reward_function(item.path, tokenizer, **model_kwargs) if load_models else item.path
        elif isinstance(item, torch.nn.Module):
            item = _wrap_model(item, tokenizer, where)
        elif not callable(item):
            raise TypeError(
                f"{where} must be a reward function, a reward model, its path or a built-in name, got "
                f"{type(item).__name__} {item!r}"
            )
        functions.append(item)
    if reward_model is not None:
        if isinstance(reward_model, torch.nn.Module):
            reward_model = _wrap_model(reward_model, tokenizer, "reward_model")
        elif not isinstance(reward_model, str):
            raise TypeError(f"reward_model must be a path, a hub id or a model, got {type(reward_model).__name__}")
        elif load_models:
            reward_model = load_reward_function(reward_model, tokenizer, **model_kwargs)
        functions.insert(0, reward_model)
    if not functions:
        raise ValueError("reward_funcs is empty (and no reward_model is given): at least one reward is needed")
    return functions, resolve_reward_weights(reward_weights, len(functions), reward_model is not None)


def resolve_reward_weights(
    weights: Sequence[float] | None, count: int, reward_model_first: bool = False
) -> list[float]:
    """``weights`` as ``count`` finite floats (``None``: 1 each).

    Raises:
        TypeError: ``weights`` is not a sequence. ValueError: not ``count`` of them, or one is not a finite
            number (a bool or a string is not a number).
    """
    if weights is None:
        return [1.0] * count
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"reward_weights must be a list of numbers, got {type(weights).__name__} {weights!r}")
    if len(weights) != count:
        order = " (the reward model first, then reward_funcs in order)" if reward_model_first else ""
        raise ValueError(f"reward_weights has {len(weights)} weights for {count} reward functions{order}")
    for index, weight in enumerate(weights):
        check_number(f"reward_weights[{index}]", weight)
    return [float(weight) for weight in weights]


def load_reward_function(
    path: str,
    tokenizer: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> RewardModelFunction:
    """The reward model at ``path`` (a folder or hub id) as a reward function: in eval mode without gradients
    (on ``device`` when given), with the tokenizer saved beside it, else ``tokenizer``; a tokenizer without a
    pad token pads with its EOS token (the model pools at the last token that is not padding)."""
    from transformers import AutoTokenizer

    from fastalign.models import load_reward_model

    try:
        reward_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if tokenizer is None:
            raise ValueError(
                f"reward_funcs: the reward model {path!r} has no tokenizer of its own and none was given"
            ) from None
        reward_tokenizer = tokenizer
    if reward_tokenizer.pad_token is None:
        reward_tokenizer.pad_token = reward_tokenizer.eos_token
    model = load_reward_model(
        path, dtype=dtype, trust_remote_code=trust_remote_code, pad_token_id=reward_tokenizer.pad_token_id
    )
    if device is not None:
        model = model.to(device)
    return RewardModelFunction(model.eval().requires_grad_(False), reward_tokenizer)


class _ModelPath:
    def __init__(self, path: str):
        self.path = path


def _from_string(
    name: str, where: str, max_completion_length: int | None, soft_punish_cache: int | None
) -> RewardFunction | _ModelPath:
    """A built-in, an imported function, or (a path) the reward model to load."""
    if name in _SOFT_OVERLONG:
        if soft_punish_cache is None or max_completion_length is None:
            missing = "soft_punish_cache (DAPO's L_cache)" if soft_punish_cache is None else "max_completion_length"
            raise ValueError(f"{where} {name} needs {missing}")
        try:
            return soft_overlong_punishment(max_completion_length, soft_punish_cache)
        except ValueError as error:
            raise ValueError(f"{where} {name}: {error}") from None
    if name in _BY_NAME:
        function = _BY_NAME[name]
        if isinstance(function, CodeReward):
            try:  # a missing or broken sandbox fails here, before any model is loaded
                function.check()
            except SandboxUnavailableError as error:
                raise SandboxUnavailableError(f"{where} {name}: {error}") from None
        return function
    if "/" in name or os.sep in name or name.startswith((".", "~")) or os.path.exists(name):
        return _ModelPath(name)
    if ":" in name or "." in name:
        return _import(name, where)
    raise ValueError(
        f"{where}: unknown reward function {name!r}; the built-ins are {', '.join(BUILTIN_REWARDS)}, or give your "
        "own as module.path:function, or a reward model's path"
    )


def _import(spec: str, where: str) -> RewardFunction:
    """``module.path:function`` or ``module.path.function`` (TRL's form), with the current folder importable."""
    module_name, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{where}: {spec!r} is not module.path:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{where}: cannot import {module_name!r} for {spec!r}: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        found = "not callable" if function is not None else "not found"
        raise ValueError(f"{where}: {attribute!r} in module {module_name!r} is {found}")
    return function


def _wrap_model(model: torch.nn.Module, tokenizer: Any, where: str) -> RewardModelFunction:
    if tokenizer is None:
        raise ValueError(f"{where} is a reward model ({type(model).__name__}): a tokenizer is needed to score with it")
    return RewardModelFunction(model, tokenizer)
