"""Held-out evaluation of a policy on the demo task: greedy answers scored by the R1 recipe's rule rewards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastalign.demo.task import general_style
from fastalign.rewards import accuracy_reward, think_format_reward


@dataclass(frozen=True)
class Evaluation:
    """Fractions over the held-out problems: correct final answer, ``<think>`` format, and the recipe's rule
    reward ``accuracy + 0.5 * format`` averaged."""

    accuracy: float
    format_rate: float
    mean_reward: float
    samples: list[dict]


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, **sampling) -> list[str]:
    """Completions of ``prompts`` (``num_return_sequences`` each, in order), ``batch_size`` prompts at a time."""
    model.eval()
    tokenizer.padding_side = "left"
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        completions += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions


@torch.no_grad()
def evaluate_policy(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int,
    batch_size: int = 100,
    format_weight: float = 0.5,
) -> Evaluation:
    """Greedy completions of ``rows`` (``prompt`` / ``solution``), scored with ``accuracy_reward`` and
    ``think_format_reward``. The model is put in eval mode and left there."""
    completions = _generate(
        model, tokenizer, [row["prompt"] for row in rows], max_new_tokens, batch_size, do_sample=False
    )
    correct = accuracy_reward(completions, solution=[row["solution"] for row in rows])
    formatted = think_format_reward(completions)
    count = max(len(rows), 1)
    accuracy = sum(c or 0.0 for c in correct) / count
    format_rate = sum(formatted) / count
    samples = [
        {"prompt": row["prompt"], "completion": text, "solution": row["solution"], "correct": bool(c)}
        for row, text, c in zip(rows, completions, correct, strict=True)
    ]
    return Evaluation(accuracy, format_rate, accuracy + format_weight * format_rate, samples)


@dataclass(frozen=True)
class GeneralEvaluation:
    """Greedy answers to general (non-reasoning) prompts: the fraction in the ``short`` style (the preference of
    the reward model's pairs) and the answers."""

    short_style_rate: float
    samples: list[dict]


@torch.no_grad()
def evaluate_general(model: torch.nn.Module, tokenizer, rows: list[dict], max_new_tokens: int) -> GeneralEvaluation:
    """Greedy answers to ``rows`` (``prompt``), and how many are written in the ``short`` style."""
    prompts = [row["prompt"] for row in rows]
    completions = _generate(model, tokenizer, prompts, max_new_tokens, 100, do_sample=False)
    styles = [general_style(text) for text in completions]
    samples = [{"prompt": p, "completion": c, "style": s} for p, c, s in zip(prompts, completions, styles, strict=True)]
    return GeneralEvaluation(styles.count("short") / max(len(rows), 1), samples)


@dataclass(frozen=True)
class SampledEvaluation:
    """Over ``k`` sampled completions per held-out problem: the fraction correct (pass@1 estimated from all ``k``)
    and the fraction of problems with at least one correct completion (pass@k)."""

    k: int
    temperature: float
    sampled_accuracy: float
    pass_at_k: float


@torch.no_grad()
def sample_policy(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int,
    k: int,
    temperature: float,
    batch_size: int = 50,
) -> SampledEvaluation:
    """``k`` completions per row sampled at ``temperature`` (from the global torch generator: seed it to repeat),
    scored with ``accuracy_reward``."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"sample_policy: k={k} must be >= 1 and temperature={temperature} > 0")
    completions = _generate(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        max_new_tokens,
        batch_size,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=k,
    )
    correct = accuracy_reward(completions, solution=[row["solution"] for row in rows for _ in range(k)])
    per_row = [correct[i * k : (i + 1) * k] for i in range(len(rows))]
    count = max(len(rows), 1)
    return SampledEvaluation(
        k=k,
        temperature=temperature,
        sampled_accuracy=sum(sum(c or 0.0 for c in row) for row in per_row) / (count * k),
        pass_at_k=sum(any(row) for row in per_row) / count,
    )


def reward_model_scorer(folder: str | Path, tokenizer):
    """The reward model saved in ``folder`` as a function ``(prompts, completions) -> list of scores``."""
    from fastalign.models import load_reward_model
    from fastalign.rewards import RewardModelFunction

    scorer = RewardModelFunction(load_reward_model(str(folder), pad_token_id=tokenizer.pad_token_id), tokenizer)

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(value) for value in scorer(prompts=prompts, completions=completions)]

    return score


def evaluate_reward_model(folder: str | Path, tokenizer, rows: list[dict]) -> float:
    """Fraction of ``prompt`` / ``chosen`` / ``rejected`` rows whose chosen completion the reward model saved in
    ``folder`` scores above the rejected one."""
    score = reward_model_scorer(folder, tokenizer)
    prompts = [row["prompt"] for row in rows]
    chosen = score(prompts, [row["chosen"] for row in rows])
    rejected = score(prompts, [row["rejected"] for row in rows])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(rows), 1)
