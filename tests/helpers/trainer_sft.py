"""An SFTTrainer on a tiny random-init model and the addition rows."""

import datasets

from fastalign.trainers import SFTConfig, SFTTrainer
from helpers.tiny import addition_rows, tiny_causal_lm, word_tokenizer


def config(tmp_path, **overrides) -> SFTConfig:
    options = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
        "max_steps": 4, "logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": False,
        "gradient_checkpointing": False, "use_cpu": True, "seed": 0, "disable_tqdm": True, "max_length": 32,
    }  # fmt: skip
    return SFTConfig(**{**options, **overrides})


def trainer(tmp_path, layout="llama", rows=None, **overrides) -> SFTTrainer:
    dataset = datasets.Dataset.from_list(rows or addition_rows())
    return SFTTrainer(
        tiny_causal_lm(layout), args=config(tmp_path, **overrides), train_dataset=dataset,
        processing_class=word_tokenizer(),
    )  # fmt: skip
