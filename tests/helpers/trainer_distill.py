"""A DistillTrainer with a tiny random-init student and a wider teacher sharing the word tokenizer."""

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastalign.trainers.configs import DistillConfig
from fastalign.trainers.distill import DistillTrainer
from helpers.tiny import SPECIALS, WORDS, addition_rows, tiny_causal_lm, word_tokenizer

VOCAB = len(SPECIALS) + len(WORDS)


def small_student(seed: int = 1, hidden_size: int = 16) -> LlamaForCausalLM:
    """A 1-layer Llama narrower than :func:`tiny_causal_lm` (the teacher): the widths differ, the vocabulary not."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def config(tmp_path, **overrides) -> DistillConfig:
    options = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_completion_length": 5,
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
    return DistillConfig(**{**options, **overrides})


def trainer(tmp_path, rows=None, student=None, teacher=None, **overrides) -> DistillTrainer:
    return DistillTrainer(
        student if student is not None else small_student(),
        teacher_model=teacher if teacher is not None else tiny_causal_lm(),
        args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list(rows if rows is not None else addition_rows()),
        processing_class=word_tokenizer(),
    )
