"""Tiny models and tokenizers built in the tests (nothing is downloaded): a word-level tokenizer with a chat
template, random-init Llama / Qwen2 configs, and a learnable toy task written as a dataset."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS = [*NUMBERS, "add", "to", "what", "is", "plus", "the", "answer", "?", ".", "good", "bad", "sky", "blue"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(layout: str = "llama", vocab_size: int = len(SPECIALS) + len(WORDS), seed: int = 0):
    """A 2-layer random-init model; ``qwen2`` ties the embeddings."""
    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
    }  # fmt: skip
    if layout == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    return LlamaForCausalLM(LlamaConfig(**common))


def addition_rows() -> list[dict[str, str]]:
    """``prompt`` / ``completion`` rows of a learnable task: the number word after ``n``."""
    return [
        {"prompt": f"add one to {NUMBERS[n]} . the answer is", "completion": f" {NUMBERS[n + 1]} ."}
        for n in range(len(NUMBERS) - 1)
    ]


def assert_resume_is_exact(make_trainer, tmp_path) -> None:
    """Six steps straight equal three steps, a checkpoint, and three more steps resumed from it.

    ``make_trainer(folder, **config_overrides)`` builds a fresh trainer writing to ``folder / "out"``.
    """
    straight = make_trainer(tmp_path / "a", max_steps=6)
    straight.train()
    make_trainer(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists()
    resumed = make_trainer(tmp_path / "c", max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
