"""Rejection sampling (best-of-k / reward threshold) into an SFT dataset, and mixing it with other SFT data.

DeepSeek-R1's second SFT stage is built this way: sample ``k`` completions per prompt from the current model,
score them with rule rewards or a reward model, keep the best one (or every one that passes), and mix the
result with non-reasoning SFT data. :func:`rejection_sample` does the first part and returns prompt-completion
rows that :class:`fastalign.trainers.SFTTrainer` reads; :func:`mix_datasets` the second;
:func:`save_jsonl` writes the result for ``fastalign sft --dataset_name out.jsonl``.

The ``fastalign rejection-sample`` command wires its flags to these functions.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from fastalign.data import detect_format, is_conversational, require_format, tokenize_prompt
from fastalign.data.formats import CONVERSATIONAL_LM, PROMPT_COMPLETION
from fastalign.ops._checks import check_number
from fastalign.rewards import score
from fastalign.rewards.resolve import resolve_reward_funcs
from fastalign.rollout import HFGenerateEngine, SamplingParams

__all__ = ["KEEP_MODES", "mix_datasets", "rejection_sample", "save_jsonl"]

KEEP_MODES = ("best", "threshold")
"""``best``: the highest-reward completion of each prompt (only if it reaches ``threshold``, when one is given);
``threshold``: every completion whose reward is at least ``threshold``."""


def _check_keep(keep: str, threshold: float | None) -> None:
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
    if keep == "threshold" and threshold is None:
        raise ValueError("keep='threshold' needs a threshold (the lowest reward a kept completion may have)")
    check_number("threshold", threshold, optional=True)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus the model's generation_config EOS ids (chat models often end turns on another)."""
    ids = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates += generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    for token in candidates:
        if isinstance(token, int) and token >= 0 and token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none")
    return ids


def _completion_text(tokenizer: Any, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """The completion as the text that continues the prompt. Decoding the completion's ids on their own drops the
    leading space of SentencePiece / word-level tokens (``"▁two"`` → ``"two"``), so the text is the decoded
    prompt + completion minus the decoded prompt when the one is a prefix of the other."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt) :]
    return tokenizer.decode(completion_ids, skip_special_tokens=True)


def _generate(engine: Any, prompt_ids: list[list[int]], params: SamplingParams, seed: int):
    if "seed" in inspect.signature(engine.generate).parameters:
        return engine.generate(prompt_ids, params, seed=seed)
    return engine.generate(prompt_ids, params)


def rejection_sample(
    model: Any,
    tokenizer: Any,
    dataset: datasets.Dataset,
    reward_funcs: Any,
    reward_weights: Sequence[float] | None = None,
    *,
    params: SamplingParams,
    keep: str = "best",
    threshold: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_length: int | None = None,
    skip_truncated: bool = False,
    deduplicate: bool = True,
    engine: Any = None,
    progress: bool = True,
    stats: dict[str, Any] | None = None,
    weights: Sequence[float] | None = None,
) -> datasets.Dataset:
    """Sample ``params.num_generations`` completions per prompt, score them, keep the best or those that pass.

    Args:
        model: the causal LM that samples (used through :class:`fastalign.rollout.HFGenerateEngine` unless
            ``engine`` is given).
        tokenizer: its tokenizer (conversational prompts are rendered with its chat template).
        dataset: rows with a ``prompt`` column, standard (a string) or conversational (a list of messages);
            every other column is handed to the reward functions and copied to the output.
        reward_funcs: TRL's reward-function contract (see :mod:`fastalign.rewards`), a reward model
            (``num_labels=1``, wrapped in :class:`~fastalign.rewards.RewardModelFunction` with ``tokenizer``),
            a built-in name, ``module:function`` or a reward model's path, or a list of them
            (:func:`fastalign.rewards.resolve.resolve_reward_funcs`).
        reward_weights: one weight per reward function (default: 1 each); the reward is the weighted NaN-aware
            sum (:func:`fastalign.rewards.score`). A completion that no function scores (all ``None``) is never
            kept.
        params: sampling settings (``num_generations`` = k, ``max_completion_length``, ``temperature`` ...).
        keep: ``"best"``: one row per prompt, its highest-reward completion (the first one on ties), and only
            when it is ``>= threshold`` if a threshold is given; ``"threshold"``: every completion with reward
            ``>= threshold``.
        threshold: the lowest reward kept (required by ``keep="threshold"``).
        batch_size: prompts per generation call (each gives ``k`` completions).
        seed: generation batch ``b`` is sampled with seed ``seed + b`` (the same inputs give the same rows).
        max_prompt_length: prompts keep their last this many tokens when sampling (the written prompt is whole).
        skip_truncated: completions that hit ``max_completion_length`` without an EOS are never kept.
        deduplicate: with ``keep="threshold"``, identical completions of one prompt are kept once.
        engine: a :class:`fastalign.rollout.RolloutEngine` to sample with instead of ``model.generate``.
        progress: show a tqdm progress bar over the prompts.
        stats: a dict to fill with the counts behind the result: ``prompts``, ``sampled`` (completions),
            ``unscored`` (no function scored them), ``truncated`` (no EOS), ``kept`` and ``best_reward`` (the
            highest reward of any completion, ``None`` when none was scored), e.g. to explain an empty result.
        weights: the former name of ``reward_weights`` (deprecated).

    Returns:
        a ``datasets.Dataset`` of prompt-completion rows in the input's style: a string completion (the text that
        continues the prompt) for standard prompts, ``[{"role": "assistant", "content": ...}]`` for
        conversational ones; the input's other columns are kept and a ``reward`` column (float) is added.

    Raises:
        ValueError: an unknown ``keep``, ``keep="threshold"`` without a threshold, a non-finite threshold, a
            dataset without a ``prompt`` column or without rows; the reward mistakes of
            :func:`~fastalign.rewards.resolve.resolve_reward_funcs`.
    """
    if weights is not None:
        warnings.warn("rejection_sample(weights=) is now reward_weights=", DeprecationWarning, stacklevel=2)
        if reward_weights is not None:
            raise TypeError("rejection_sample got both reward_weights and its former name weights")
        reward_weights = weights
    _check_keep(keep, threshold)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a fastalign.rollout.SamplingParams, got {type(params).__name__}")
    require_format(dataset, "rl")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows: nothing to sample")
    functions, reward_weights = resolve_reward_funcs(
        reward_funcs, reward_weights, tokenizer=tokenizer, max_completion_length=params.max_completion_length
    )
    if engine is None:
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        engine = HFGenerateEngine(model, pad_token_id=pad, eos_token_id=_eos_ids(model, tokenizer))

    from tqdm.auto import tqdm

    k = params.num_generations
    kept: list[dict[str, Any]] = []
    counts: dict[str, Any] = {"prompts": len(dataset), "sampled": 0, "unscored": 0, "truncated": 0}
    best_reward = -math.inf
    bar = tqdm(total=len(dataset), desc="rejection sampling", unit="prompt", disable=not progress)
    for b, start in enumerate(range(0, len(dataset), batch_size)):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
        prompt_ids = [
            tokenize_prompt(row, tokenizer, max_prompt_length=max_prompt_length)["prompt_ids"] for row in rows
        ]
        batch = _generate(engine, prompt_ids, params, seed + b)
        ids = [
            c[m.bool()].tolist() for c, m in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu(), strict=True)
        ]
        truncated = batch.truncated.cpu().tolist()
        repeated = [row for row in rows for _ in range(k)]
        texts = [_completion_text(tokenizer, prompt_ids[i // k], c) for i, c in enumerate(ids)]
        conversational = [is_conversational({"prompt": row["prompt"]}) for row in repeated]
        completions = [
            [{"role": "assistant", "content": text}] if conv else text
            for text, conv in zip(texts, conversational, strict=True)
        ]
        columns = {key: [row[key] for row in repeated] for key in rows[0] if key != "prompt"}
        _, rewards = score(functions, reward_weights, [row["prompt"] for row in repeated], completions, ids, columns)
        rewards = rewards.tolist()
        scored = [r for r in rewards if not math.isnan(r)]
        counts["sampled"] += len(rewards)
        counts["unscored"] += len(rewards) - len(scored)
        counts["truncated"] += sum(map(bool, truncated))
        best_reward = max([best_reward, *scored])
        for p, row in enumerate(rows):
            candidates = [
                i
                for i in range(p * k, (p + 1) * k)
                if not math.isnan(rewards[i]) and not (skip_truncated and truncated[i])
            ]
            chosen = [max(candidates, key=lambda i: (rewards[i], -i))] if keep == "best" and candidates else []
            if keep == "threshold":
                chosen = candidates
            if threshold is not None:
                chosen = [i for i in chosen if rewards[i] >= threshold]
            if keep == "threshold" and deduplicate:
                seen: set[str] = set()
                chosen = [i for i in chosen if not (texts[i] in seen or seen.add(texts[i]))]
            for i in chosen:
                others = {key: value for key, value in row.items() if key not in ("prompt", "completion", "reward")}
                kept.append({"prompt": row["prompt"], "completion": completions[i], **others, "reward": rewards[i]})
        bar.update(len(rows))
    bar.close()
    if stats is not None:
        stats.update(counts, kept=len(kept), best_reward=best_reward if best_reward > -math.inf else None)
    if not kept:
        columns = ["prompt", "completion", *(c for c in dataset.column_names if c not in ("prompt", "completion"))]
        return datasets.Dataset.from_dict({c: [] for c in dict.fromkeys([*columns, "reward"])})
    return datasets.Dataset.from_list(kept)


def _as_prompt_completion(rows: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """``messages`` rows split into prompt (every message before the last) and completion (the last, an
    assistant message)."""
    if fmt == PROMPT_COMPLETION:
        return rows
    out = []
    for row in rows:
        messages = list(row["messages"])
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise ValueError(
                "a messages row of the mix dataset must end with an assistant message after at least one other "
                f"message (it becomes the completion), got roles {[m.get('role') for m in messages]}"
            )
        others = {key: value for key, value in row.items() if key != "messages"}
        out.append({"prompt": messages[:-1], "completion": messages[-1:], **others})
    return out


def mix_datasets(dataset: datasets.Dataset, mix: datasets.Dataset, ratio: float, *, seed: int = 0) -> datasets.Dataset:
    """``dataset`` plus rows sampled from ``mix`` so that a fraction ``ratio`` of the result comes from ``mix``
    (R1 mixes its rejection-sampled reasoning data with non-reasoning SFT data), shuffled with ``seed``.

    ``round(len(dataset) * ratio / (1 - ratio))`` rows are drawn from ``mix`` without replacement; when ``mix``
    is smaller than that, it is repeated whole and the rest drawn (with a warning). ``mix`` must be
    prompt-completion data of the same style as ``dataset`` (standard or conversational) or, for conversational
    data, ``messages`` rows (the last, assistant, message becomes the completion). Columns are the union of
    both; a row lacking one holds ``None`` there (e.g. ``reward`` for the mixed-in rows).

    Raises:
        ValueError: ``ratio`` outside ``[0, 1)``, or ``mix`` in another format or style.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(
            f"the mix ratio is the fraction of output rows taken from the mix dataset, in [0, 1): got {ratio!r}"
        )
    if ratio == 0 or len(dataset) == 0:
        return dataset
    if len(mix) == 0:
        raise ValueError("the mix dataset has no rows")
    require_format(dataset, "sft")
    target_conversational = is_conversational(dataset[0])
    fmt = detect_format(mix)
    if fmt not in (PROMPT_COMPLETION, CONVERSATIONAL_LM) or (fmt == CONVERSATIONAL_LM and not target_conversational):
        accepted = "prompt + completion" + (" or messages" if target_conversational else "")
        raise ValueError(
            f"the mix dataset must hold {accepted} rows like the sampled data, got columns {mix.column_names}"
        )
    if fmt == PROMPT_COMPLETION and is_conversational(mix[0]) != target_conversational:
        styles = ("standard", "conversational")
        raise ValueError(
            f"the sampled data is {styles[target_conversational]} but the mix dataset is "
            f"{styles[not target_conversational]}: mix data of one style"
        )
    rng = random.Random(seed)
    wanted = round(len(dataset) * ratio / (1 - ratio))
    indices = list(range(len(mix))) * (wanted // len(mix)) + rng.sample(range(len(mix)), wanted % len(mix))
    if wanted > len(mix):
        warnings.warn(
            f"the mix dataset has {len(mix)} rows but mix ratio {ratio} asks for {wanted}: rows are repeated",
            stacklevel=2,
        )
    rows = dataset.to_list() + _as_prompt_completion(mix.select(indices).to_list(), fmt)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{key: row.get(key) for key in columns} for row in rows]
    rng.shuffle(rows)
    return datasets.Dataset.from_list(rows)


def save_jsonl(dataset: datasets.Dataset, path: str | Path) -> Path:
    """Write ``dataset`` as JSON lines (one row per line, UTF-8), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for row in dataset:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
