"""Tokenizing one example of each format, TRL 1.x style.

Conversational values (lists of ``{"role", "content"}`` messages) are rendered to text with
``tokenizer.apply_chat_template(..., tokenize=False)`` (prompts with ``add_generation_prompt=True``) and the
text is tokenized with ``add_special_tokens=False``: the template writes the special tokens it wants (BOS, the
end-of-turn EOS). Standard strings are tokenized with the tokenizer's own special tokens (a BOS where the
tokenizer adds one) and get an EOS appended to the completion / text when they do not end with one.

Every function returns plain Python lists of token ids, ready for ``datasets.Dataset.map`` and the collators.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from fastalign.data.formats import (
    CONVERSATIONAL_LM,
    LANGUAGE_MODELING,
    PREFERENCE,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    detect_format,
    is_conversational,
    maybe_extract_prompt,
    require_format,
)
from fastalign.data.values import value_problem

Messages = list[dict[str, Any]]


def _render(tokenizer, messages: Messages, *, add_generation_prompt: bool, tools=None, **template_kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
    )


def _ids(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _check_example(example: Mapping[str, Any]) -> None:
    for column, value in example.items():
        problem = value_problem(column, value, example)
        if problem is not None:
            raise ValueError(problem)


def _with_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is not None and (not ids or ids[-1] != eos_token_id):
        return [*ids, eos_token_id]
    return ids


def _check_messages(value: Any, column: str) -> Messages:
    if not is_conversational({column: value}):
        raise ValueError(
            f"column {column!r} mixes conversational and standard values: expected a list of "
            f"{{'role', 'content'}} messages, got {type(value).__name__}"
        )
    return list(value)


def _render_prompt_and_continuation(
    tokenizer, prompt: Messages, continuation: Messages, column: str, **template_kwargs
) -> tuple[str, str]:
    """(prompt text with the generation prompt, the rest of the rendered ``prompt + continuation``)."""
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True, **template_kwargs)
    full_text = _render(tokenizer, prompt + continuation, add_generation_prompt=False, **template_kwargs)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"the chat template does not render the prompt (with add_generation_prompt=True) as a prefix of "
            f"prompt + {column}; fastalign cannot tell where the {column} starts"
        )
    return prompt_text, full_text[len(prompt_text) :]


def tokenize_sft(
    example: Mapping[str, Any],
    tokenizer,
    *,
    max_length: int | None = None,
    completion_only_loss: bool = True,
    tools: list | None = None,
    **template_kwargs: Any,
) -> dict[str, list[int]]:
    """Tokenize one SFT example (format detected from its keys).

    * ``text`` (language modeling): ``tokenizer(text)`` + EOS; loss on every token.
    * ``messages`` (conversational LM): the rendered conversation; loss on every token (as TRL without
      ``assistant_only_loss``, which fastalign does not implement).
    * ``prompt`` + ``completion``, standard: ``tokenizer(prompt + completion)`` + EOS, the first
      ``len(tokenizer(prompt))`` tokens are the prompt (a warning if tokenizing the pair merges tokens across
      the boundary, as TRL).
    * ``prompt`` + ``completion``, conversational: the prompt rendered with ``add_generation_prompt=True``,
      then the rest of the rendered ``prompt + completion``.

    With ``completion_only_loss`` (TRL's default) the loss is on the completion tokens only; otherwise on all.
    Sequences longer than ``max_length`` keep their first ``max_length`` tokens (TRL's ``keep_start``).

    Returns:
        ``{"input_ids": list[int], "completion_mask": list[int]}`` of equal length; ``completion_mask`` is 1 on
        the tokens that carry loss.
    """
    _check_example(example)
    fmt = detect_format(example)
    eos = tokenizer.eos_token_id
    if fmt == PROMPT_COMPLETION:
        prompt, completion = example["prompt"], example["completion"]
        if is_conversational(example):
            prompt_text, completion_text = _render_prompt_and_continuation(
                tokenizer,
                _check_messages(prompt, "prompt"),
                _check_messages(completion, "completion"),
                "completion",
                tools=tools,
                **template_kwargs,
            )
            prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens=False)
            input_ids = _ids(tokenizer, prompt_text + completion_text, add_special_tokens=False)
        else:
            prompt_ids = _ids(tokenizer, prompt, add_special_tokens=True)
            input_ids = _with_eos(_ids(tokenizer, prompt + completion, add_special_tokens=True), eos)
        if input_ids[: len(prompt_ids)] != prompt_ids:
            warnings.warn(
                "the tokenized prompt is not a prefix of the tokenized prompt + completion (tokens merge across "
                "the boundary); the completion mask starts at the prompt's token count",
                stacklevel=2,
            )
        n_prompt = min(len(prompt_ids), len(input_ids))
        completion_mask = [0] * n_prompt + [1] * (len(input_ids) - n_prompt)
        if not completion_only_loss:
            completion_mask = [1] * len(input_ids)
    elif fmt == CONVERSATIONAL_LM:
        text = _render(
            tokenizer,
            _check_messages(example["messages"], "messages"),
            add_generation_prompt=False,
            tools=tools,
            **template_kwargs,
        )
        input_ids = _ids(tokenizer, text, add_special_tokens=False)
        completion_mask = [1] * len(input_ids)
    elif fmt == LANGUAGE_MODELING:
        input_ids = _with_eos(_ids(tokenizer, example["text"], add_special_tokens=True), eos)
        completion_mask = [1] * len(input_ids)
    else:
        raise ValueError(
            f"tokenize_sft reads text, messages or prompt + completion examples, got a {fmt} example "
            f"(keys {sorted(example)})"
        )
    if max_length is not None:
        input_ids, completion_mask = input_ids[:max_length], completion_mask[:max_length]
    return {"input_ids": input_ids, "completion_mask": completion_mask}


def tokenize_preference(
    example: Mapping[str, Any],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    tools: list | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """Tokenize one preference example (explicit or implicit prompt; standard or conversational).

    Without a ``prompt`` the shared prefix of ``chosen`` and ``rejected`` is the prompt
    (:func:`~fastalign.data.formats.maybe_extract_prompt`). Standard: ``tokenizer(prompt)`` and the completions
    tokenized without special tokens, each + EOS. Conversational: the prompt rendered with
    ``add_generation_prompt=True``; each completion is the rest of the rendered ``prompt + completion``.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens; then, if ``max_length`` is given, the
    prompt keeps at most its last ``max_length - 1`` tokens (so every completion keeps at least one token) and
    each completion keeps its first ``max_length - len(prompt_ids)`` tokens.

    Returns:
        ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (``list[int]`` each), plus ``"margin"`` (float) when
        the example has one (reward-model margins).
    """
    _check_example(example)
    ex = maybe_extract_prompt(example)
    prompt, chosen, rejected = ex["prompt"], ex["chosen"], ex["rejected"]
    if is_conversational({"chosen": chosen}) or is_conversational({"prompt": prompt}):
        prompt = _check_messages(prompt, "prompt") if prompt else []
        pieces = [
            _render_prompt_and_continuation(
                tokenizer, prompt, _check_messages(value, column), column, tools=tools, **template_kwargs
            )
            for column, value in (("chosen", chosen), ("rejected", rejected))
        ]
        prompt_ids = _ids(tokenizer, pieces[0][0], add_special_tokens=False)
        chosen_ids, rejected_ids = (_ids(tokenizer, p[1], add_special_tokens=False) for p in pieces)
    else:
        prompt_ids = _ids(tokenizer, prompt, add_special_tokens=True)
        eos = tokenizer.eos_token_id
        chosen_ids = _with_eos(_ids(tokenizer, chosen, add_special_tokens=False), eos)
        rejected_ids = _with_eos(_ids(tokenizer, rejected, add_special_tokens=False), eos)
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:] if max_prompt_length > 0 else []
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        keep = max_length - 1
        prompt_ids = (prompt_ids[-keep:] if keep > 0 else []) if len(prompt_ids) > keep else prompt_ids
        budget = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    out: dict[str, Any] = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
    if ex.get("margin") is not None:
        out["margin"] = float(ex["margin"])
    return out


def tokenize_prompt(
    example: Mapping[str, Any],
    tokenizer,
    *,
    max_prompt_length: int | None = None,
    tools: list | None = None,
    **template_kwargs: Any,
) -> dict[str, list[int]]:
    """Tokenize the ``prompt`` of one example for generation (RL): conversational prompts rendered with
    ``add_generation_prompt=True``, standard ones with ``tokenizer(prompt)``; no EOS. Prompts longer than
    ``max_prompt_length`` keep their last tokens.

    Returns:
        ``{"prompt_ids": list[int]}``.
    """
    if "prompt" not in example:
        raise ValueError(f"tokenize_prompt needs a 'prompt' column, got keys {sorted(example)}")
    _check_example(example)
    prompt = example["prompt"]
    if is_conversational({"prompt": prompt}):
        text = _render(tokenizer, prompt, add_generation_prompt=True, tools=tools, **template_kwargs)
        prompt_ids = _ids(tokenizer, text, add_special_tokens=False)
    else:
        prompt_ids = _ids(tokenizer, prompt, add_special_tokens=True)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:] if max_prompt_length > 0 else []
    return {"prompt_ids": prompt_ids}


_TOKENIZERS = {"sft": tokenize_sft, "reward": tokenize_preference, "dpo": tokenize_preference}


def tokenize_dataset(dataset, tokenizer, trainer: str, *, num_proc: int | None = None, **kwargs: Any):
    """Check ``dataset`` fits ``trainer`` (:func:`~fastalign.data.formats.require_format`) and map the matching
    tokenizer over it: ``"sft"`` → :func:`tokenize_sft`, ``"reward"`` / ``"dpo"`` → :func:`tokenize_preference`
    (the text columns are removed), ``"rl"`` / ``"grpo"`` / ``"ppo"`` → :func:`tokenize_prompt` (every column
    is kept: reward functions read them). ``kwargs`` go to the tokenizing function.

    Returns:
        the mapped ``datasets.Dataset``.
    """
    fmt = require_format(dataset, trainer)
    if fmt == PROMPT_ONLY:
        return dataset.map(tokenize_prompt, fn_kwargs={"tokenizer": tokenizer, **kwargs}, num_proc=num_proc)
    fn = _TOKENIZERS[trainer]
    text_columns: Sequence[str] = (
        ("prompt", "chosen", "rejected") if fmt == PREFERENCE else ("text", "messages", "prompt", "completion")
    )
    remove = [c for c in dataset.column_names if c in text_columns]
    return dataset.map(fn, fn_kwargs={"tokenizer": tokenizer, **kwargs}, remove_columns=remove, num_proc=num_proc)
