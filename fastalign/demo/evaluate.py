"""Held-out evaluation of a policy on the demo task: greedy answers scored by the R1 recipe's rule rewards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

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
    model.eval()
    tokenizer.padding_side = "left"
    completions: list[str] = []
    for start in range(0, len(rows), batch_size):
        prompts = [row["prompt"] for row in rows[start : start + batch_size]]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
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


@torch.no_grad()
def evaluate_reward_model(folder: str | Path, tokenizer, rows: list[dict]) -> float:
    """Fraction of ``prompt`` / ``chosen`` / ``rejected`` rows whose chosen completion the reward model saved in
    ``folder`` scores above the rejected one."""
    from fastalign.models import load_reward_model
    from fastalign.rewards import RewardModelFunction

    scorer = RewardModelFunction(load_reward_model(str(folder), pad_token_id=tokenizer.pad_token_id), tokenizer)
    prompts = [row["prompt"] for row in rows]
    chosen = scorer(prompts=prompts, completions=[row["chosen"] for row in rows])
    rejected = scorer(prompts=prompts, completions=[row["rejected"] for row in rows])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(rows), 1)
