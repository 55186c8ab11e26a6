"""A RewardTrainer on a tiny random-init sequence-classification model and learnable preference pairs."""

import datasets
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

from fastalign.trainers import RewardConfig, RewardTrainer
from helpers.tiny import NUMBERS, SPECIALS, WORDS, word_tokenizer


def tiny_reward_model(layout: str = "llama", seed: int = 0, **overrides):
    """A 2-layer random-init ``*ForSequenceClassification`` with one label (no pad_token_id: the trainer sets it)."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": len(SPECIALS) + len(WORDS), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "bos_token_id": 2, "eos_token_id": 3, "num_labels": 1, **overrides,
    }  # fmt: skip
    if layout == "qwen2":
        return Qwen2ForSequenceClassification(Qwen2Config(**common))
    return LlamaForSequenceClassification(LlamaConfig(**common))


def preference_rows(margin: bool = False) -> list[dict]:
    """Explicit-prompt pairs of a learnable task: the right successor is preferred to a wrong number."""
    rows = []
    for n in range(len(NUMBERS) - 1):
        for wrong in (n, (n + 5) % len(NUMBERS)):
            row = {
                "prompt": f"add one to {NUMBERS[n]} . the answer is",
                "chosen": f" {NUMBERS[n + 1]} .",
                "rejected": f" {NUMBERS[wrong]} .",
            }
            if margin:
                row["margin"] = 0.25 * (n % 3)
            rows.append(row)
    return rows


def config(tmp_path, **overrides) -> RewardConfig:
    options = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
        "max_steps": 4, "logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": False,
        "gradient_checkpointing": False, "use_cpu": True, "seed": 0, "disable_tqdm": True, "max_length": 32,
    }  # fmt: skip
    return RewardConfig(**{**options, **overrides})


def trainer(tmp_path, layout="llama", rows=None, model=None, eval_rows=None, peft_config=None, **overrides):
    return RewardTrainer(
        model if model is not None else tiny_reward_model(layout), args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list(rows or preference_rows()),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=word_tokenizer(), peft_config=peft_config,
    )  # fmt: skip
