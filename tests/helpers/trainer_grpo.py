"""A GRPOTrainer on a tiny random-init model, its prompts and toy rewards."""

import datasets

from fastalign.trainers.configs import GRPOConfig
from fastalign.trainers.grpo import GRPOTrainer
from helpers.tiny import NUMBERS, tiny_causal_lm, word_tokenizer

PROMPTS = [{"prompt": f"what is {NUMBERS[n]} plus one ?", "number": n} for n in range(8)]


def blue_reward(completions, **kwargs):
    """The share of "blue" words in the completion: learnable by a tiny model in a few dozen steps."""
    return [text.split().count("blue") / max(1, len(text.split())) for text in completions]


def id_hash_reward(completions, completion_ids, **kwargs):
    """A reward that differs between samples of one prompt almost surely (for the dynamic-sampling test)."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def config(tmp_path, **overrides) -> GRPOConfig:
    options = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": 1e-2,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return GRPOConfig(**{**options, **overrides})


def trainer(tmp_path, reward=blue_reward, rows=PROMPTS, **overrides) -> GRPOTrainer:
    return GRPOTrainer(
        tiny_causal_lm(),
        reward_funcs=reward,
        args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_tokenizer(),
    )
