"""The reward-function contract (TRL's), text helpers, reward-model scoring and the weighted combination.

A reward function is any callable

    f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

called with keyword arguments only: ``prompts`` and ``completions`` (one entry per completion; strings, or for
conversational data lists of ``{"role", "content"}`` messages), ``completion_ids`` (the generated token ids, one
``list[int]`` per completion) and every other dataset column as a list aligned with the completions (e.g.
``solution``, ``tests``). It returns one reward per completion; ``None`` means "not applicable to this row" and
becomes NaN, which the weighted sum skips. Functions must accept ``**kwargs`` (the trainer may pass extra keys).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float | None]]
"""``f(prompts, completions, completion_ids, **columns) -> list[float | None]`` (keyword arguments)."""


# --------------------------------------------------------------------------------------------------------------
# text helpers
# --------------------------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    """A message's ``content``: a string, or a list of parts (``{"type": "text", "text": ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def is_conversational_value(value: Any) -> bool:
    """Whether ``value`` is a list of messages (dicts with ``role`` and ``content``), as in TRL."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and isinstance(value[0], Mapping)
        and "role" in value[0]
        and "content" in value[0]
    )


def completion_text(completion: Any) -> str:
    """The text of one completion, standard or conversational; never raises.

    A string is returned as is. A conversational completion (a list of messages, usually one assistant message)
    gives the content of its assistant messages joined with newlines (all messages when none is marked
    ``assistant``); a single message dict gives its content. Anything else is ``str()``-ed.
    """
    try:
        if isinstance(completion, str):
            return completion
        if isinstance(completion, Mapping):
            return _content_text(completion.get("content"))
        if isinstance(completion, Sequence):
            messages = [m for m in completion if isinstance(m, Mapping)]
            if not messages:
                return "".join(x for x in completion if isinstance(x, str))
            assistant = [m for m in messages if m.get("role") == "assistant"] or messages
            return "\n".join(_content_text(m.get("content")) for m in assistant)
        return "" if completion is None else str(completion)
    except Exception:  # reward helpers never raise on odd input
        return ""


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """:func:`completion_text` of every completion."""
    return [completion_text(c) for c in completions]


def reward_function_name(func: Any) -> str:
    """The name used for logging: ``func.name``, else ``__name__``, else the class name."""
    name = getattr(func, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(func, "__name__", None)
    if isinstance(name, str) and name:
        return name
    config = getattr(func, "config", None)
    if config is not None and getattr(config, "_name_or_path", None):
        return str(config._name_or_path).rstrip("/").split("/")[-1]
    return type(func).__name__


# --------------------------------------------------------------------------------------------------------------
# reward model
# --------------------------------------------------------------------------------------------------------------


class RewardModelFunction:
    """A scalar reward model used as a reward function.

    Wraps an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (e.g. trained with ``fastalign reward``)
    and its tokenizer. Each prompt + completion is tokenized the way fastalign's reward trainer tokenizes a
    preference pair, so the model sees the text it was trained on:

    - standard (strings): ``tokenizer(prompt)`` (with the tokenizer's special tokens, e.g. BOS) followed by
      ``tokenizer(completion, add_special_tokens=False)`` and an EOS when the completion does not end with one;
    - conversational (lists of messages): ``prompt + completion`` rendered with the tokenizer's chat template
      (``add_generation_prompt=False``) and tokenized with ``add_special_tokens=False``.

    Rows are scored in batches of ``batch_size``, right-padded with the pad token, under ``torch.inference_mode``
    with the model in eval mode (its previous mode is restored). The score is the model's own pooled logit
    (``logits[:, 0]``: the last non-pad token), returned as Python floats.

    Args:
        model: the reward model; its device is used for the inputs.
        tokenizer: its tokenizer (a chat template is needed for conversational data).
        batch_size: rows per forward pass.
        max_length: when given, a longer sequence keeps its last prompt tokens and its first completion tokens
            so that it fits (the prompt keeps at most ``max_length - 1`` tokens, as in the reward trainer).
        name: the name used for logging; default: the model's ``name_or_path`` (last path part).
        template_kwargs: extra keyword arguments for ``apply_chat_template``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        name: str | None = None,
        **template_kwargs: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "num_labels", 1) != 1:
            raise ValueError(f"the reward model must have num_labels=1, got {config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.template_kwargs = template_kwargs
        if name is None:
            name_or_path = getattr(config, "_name_or_path", "") if config is not None else ""
            name = str(name_or_path).rstrip("/").split("/")[-1] or "reward_model"
        self.name = name
        self.__name__ = name

    def _pad_token_id(self) -> int:
        config = getattr(self.model, "config", None)
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if pad is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
            if pad is None:
                raise ValueError(
                    "the reward model pools at the last non-pad token and needs a pad token: neither "
                    "model.config.pad_token_id nor tokenizer.pad_token_id is set"
                )
            if config is not None:
                # the Hugging Face pooling reads config.pad_token_id (as fastalign.models.load_reward_model sets it)
                config.pad_token_id = pad
        return int(pad)

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def tokenize(self, prompt: Any, completion: Any) -> list[int]:
        """The token ids the model scores for one prompt + completion."""
        if is_conversational_value(prompt) or is_conversational_value(completion):
            prompt_messages = list(prompt) if is_conversational_value(prompt) else []
            if isinstance(completion, str):
                completion_messages = [{"role": "assistant", "content": completion}]
            elif isinstance(completion, Mapping):
                completion_messages = [dict(completion)]
            else:
                completion_messages = list(completion)
            full = self.tokenizer.apply_chat_template(
                prompt_messages + completion_messages,
                tokenize=False,
                add_generation_prompt=False,
                **self.template_kwargs,
            )
            ids = self._ids(full, special=False)
            if self.max_length is not None and len(ids) > self.max_length:
                head = self.tokenizer.apply_chat_template(
                    prompt_messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
                )
                n_prompt = len(self._ids(head, special=False)) if full.startswith(head) else 0
                return self._truncate(ids[:n_prompt], ids[n_prompt:])
            return ids
        prompt_ids = self._ids(str(prompt), special=True)
        completion_ids = self._ids(completion_text(completion), special=False)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and (not completion_ids or completion_ids[-1] != eos):
            completion_ids.append(int(eos))
        return self._truncate(prompt_ids, completion_ids)

    def _truncate(self, prompt_ids: list[int], completion_ids: list[int]) -> list[int]:
        if self.max_length is None or len(prompt_ids) + len(completion_ids) <= self.max_length:
            return prompt_ids + completion_ids
        keep = self.max_length - 1
        if len(prompt_ids) > keep:
            prompt_ids = prompt_ids[-keep:]
        return prompt_ids + completion_ids[: self.max_length - len(prompt_ids)]

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [self.tokenize(p, c) for p, c in zip(prompts, completions, strict=True)]
        if not rows:
            return []
        pad = self._pad_token_id()
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        from fastalign.models.heads import sequence_rewards

        was_training = self.model.training
        self.model.eval()
        scores: list[float] = []
        try:
            with torch.inference_mode():
                for start in range(0, len(rows), self.batch_size):
                    batch = rows[start : start + self.batch_size]
                    width = max(len(r) for r in batch)
                    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for i, r in enumerate(batch):
                        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                        attention_mask[i, : len(r)] = 1
                    out = sequence_rewards(self.model, input_ids.to(device), attention_mask.to(device))
                    scores.extend(float(x) for x in out.float().cpu())
        finally:
            self.model.train(was_training)
        return scores

    def __repr__(self) -> str:
        return f"RewardModelFunction(name={self.name!r}, batch_size={self.batch_size})"


# --------------------------------------------------------------------------------------------------------------
# combination
# --------------------------------------------------------------------------------------------------------------


def _to_float(value: Any, func_name: str, row: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        value = float(value)
        if math.isinf(value):  # it would turn the group's baseline and every advantage into inf/NaN
            raise ValueError(
                f"reward function {func_name!r} returned {value} for completion {row}: rewards must be finite "
                "(return None, or NaN, for a completion the function does not apply to)"
            )
        return value
    raise TypeError(
        f"reward function {func_name!r} returned {value!r} ({type(value).__name__}) for completion {row}: "
        "expected a real number or None"
    )


def _call(func: Any, prompts, completions, completion_ids, columns) -> Any:
    if isinstance(func, torch.nn.Module) and not isinstance(func, RewardModelFunction):
        raise TypeError(
            f"got a bare {type(func).__name__} as a reward function: wrap a reward model in "
            "RewardModelFunction(model, tokenizer) so it knows how to tokenize the texts"
        )
    return func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)


def score(
    reward_funcs: Sequence[RewardFunction] | RewardFunction,
    weights: Sequence[float] | torch.Tensor | None,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    unscorable: str = "nan",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function and combine the rewards with a weighted, NaN-aware sum (as TRL's GRPO).

    Each function is called as ``f(prompts=prompts, completions=completions, completion_ids=completion_ids,
    **columns)``; a :class:`RewardModelFunction` is one of them.

    Args:
        reward_funcs: the functions (or a single one).
        weights: one weight per function; ``None`` = all ones.
        prompts, completions: one entry per completion (strings or lists of messages).
        completion_ids: the generated token ids per completion (``None`` = empty lists).
        columns: the other dataset columns, each a list with one entry per completion.
        unscorable: what the total is for a completion where *every* function returned ``None``: ``"nan"``
            (TRL 1.16's GRPO: the row is unscorable, so its total is NaN and the trainer leaves it out of the
            group baseline and gives it a zero advantage) or ``"zero"`` (the plain ``nansum`` value, 0). A
            warning is logged either way.

    Returns:
        ``(per_function, total)``: ``per_function`` is ``[N, F]`` float32 with NaN where a function returned
        ``None`` or NaN (both mean "does not apply": the weighted sum skips them, as TRL's does);
        ``total[n] = nansum_f(weights[f] * per_function[n, f])``, ``[N]`` float32.

    Raises:
        ValueError: mismatched lengths (inputs, columns, weights), a function returning the wrong number of
            rewards, or a reward of ±inf (named with the function and the completion). TypeError: a function
            returning something that is not a list of numbers / ``None``.
    """
    if unscorable not in ("nan", "zero"):
        raise ValueError(f"unscorable must be 'nan' or 'zero', got {unscorable!r}")
    funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
    if not funcs:
        raise ValueError("score needs at least one reward function")
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{n} prompts but {len(completions)} completions")
    if completion_ids is None:
        completion_ids = [[] for _ in range(n)]
    elif len(completion_ids) != n:
        raise ValueError(f"{n} completions but {len(completion_ids)} completion_ids")
    columns = dict(columns or {})
    for key in ("prompts", "completions", "completion_ids"):
        if key in columns:
            raise ValueError(f"column {key!r} clashes with the argument of the same name")
    for key, values in columns.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n:
            got = len(values) if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(f"column {key!r} must be a list with one entry per completion ({n}), got {got}")
    if weights is None:
        w = torch.ones(len(funcs), dtype=torch.float32)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != len(funcs):
            raise ValueError(f"{w.numel()} reward weights for {len(funcs)} reward functions")
        if not torch.isfinite(w).all():
            raise ValueError(f"reward weights must be finite, got {w.tolist()}")

    per_function = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    for j, func in enumerate(funcs):
        name = reward_function_name(func)
        out = _call(func, list(prompts), list(completions), list(completion_ids), columns)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().flatten().tolist()
        elif not isinstance(out, Sequence) and hasattr(out, "tolist"):  # numpy arrays
            out = out.tolist()
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
            raise TypeError(
                f"reward function {name!r} returned {type(out).__name__}: expected a list with one reward "
                f"(float or None) per completion"
            )
        if len(out) != n:
            raise ValueError(
                f"reward function {name!r} returned {len(out)} rewards, but {n} were expected "
                "(one per prompt-completion pair)"
            )
        per_function[:, j] = torch.tensor([_to_float(v, name, i) for i, v in enumerate(out)], dtype=torch.float32)

    total = (per_function * w.unsqueeze(0)).nansum(dim=1)
    all_none = torch.isnan(per_function).all(dim=1)
    if all_none.any():
        rows = all_none.nonzero(as_tuple=True)[0].tolist()
        logger.warning(
            "every reward function returned None for completion(s) %s (first completion: %r); "
            "make sure at least one reward function applies to every row",
            rows[:10],
            completion_text(completions[rows[0]])[:200],
        )
        if unscorable == "nan":
            total[all_none] = math.nan
    return per_function, total
