"""A PPOTrainer on a tiny random-init model, its prompts and toy reward."""

import datasets

from fastalign.trainers.configs import PPOConfig
from fastalign.trainers.ppo import PPOTrainer
from helpers.tiny import NUMBERS, tiny_causal_lm, word_tokenizer

PROMPTS = [{"prompt": f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?"} for a in range(8) for b in range(4)]


def blue_reward(completions, **kwargs):
    """The share of "blue" words in the completion: learnable by a tiny model in a few dozen steps."""
    return [text.split().count("blue") / max(1, len(text.split())) for text in completions]


def config(tmp_path, **overrides) -> PPOConfig:
    options = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "response_length": 6,
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
    return PPOConfig(**{**options, **overrides})


def trainer(tmp_path, rows=PROMPTS, ref_model=None, **overrides) -> PPOTrainer:
    return PPOTrainer(
        tiny_causal_lm(),
        reward_funcs=blue_reward,
        args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_tokenizer(),
        ref_model=ref_model,
    )
