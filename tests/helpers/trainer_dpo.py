"""A DPOTrainer on a tiny random-init model and a learnable toy preference."""

import datasets

from fastalign.trainers import DPOConfig, DPOTrainer
from helpers.tiny import NUMBERS, tiny_causal_lm, word_tokenizer


def preference_rows() -> list[dict[str, str]]:
    """Prefer the number after ``n`` over a wrong one: learnable from the prompt."""
    return [
        {"prompt": f"add one to {NUMBERS[n]} . the answer is", "chosen": f" {NUMBERS[n + 1]} .",
         "rejected": f" {NUMBERS[(n + 4) % 10]} ."}
        for n in range(len(NUMBERS) - 1)
    ]  # fmt: skip


def config(tmp_path, **overrides) -> DPOConfig:
    options = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 1e-2,
        "max_steps": 3, "logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": False,
        "gradient_checkpointing": False, "use_cpu": True, "seed": 0, "disable_tqdm": True, "max_length": 32,
    }  # fmt: skip
    return DPOConfig(**{**options, **overrides})


def trainer(tmp_path, layout="llama", rows=None, ref_model=None, peft_config=None, eval_rows=None, **overrides):
    return DPOTrainer(
        tiny_causal_lm(layout), ref_model=ref_model, args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list(rows or preference_rows()),
        eval_dataset=None if eval_rows is None else datasets.Dataset.from_list(eval_rows),
        processing_class=word_tokenizer(), peft_config=peft_config,
    )  # fmt: skip
