"""SFTTrainer on tiny random-init models: it learns, one step equals the eager (full-logits) step, resume is
exact, packing trains, and datasets in the wrong format are refused with the missing column named."""

import datasets
import pytest
import torch
from helpers.tiny import addition_rows, assert_resume_is_exact, tiny_causal_lm, word_tokenizer
from helpers.trainer_sft import config, trainer

from fastalign.trainers import SFTTrainer


def losses(history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in history if "loss" in entry]


def test_loss_decreases_on_a_learnable_task(tmp_path):
    sft = trainer(tmp_path, max_steps=40, learning_rate=1e-2)
    sft.train()
    curve = losses(sft.state.log_history)
    assert curve[-1] < 0.5 * curve[0], curve


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
def test_one_step_equals_the_eager_full_logits_step(tmp_path, layout):
    """Loss and every parameter's gradient of the fused path equal the model's own loss from full logits."""
    sft = trainer(tmp_path, layout=layout)
    batch = next(iter(sft.get_train_dataloader()))
    batch = {key: value.to(sft.model.device) for key, value in batch.items()}
    model = sft.model
    fused = sft.compute_loss(model, batch)
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    eager = model(**batch).loss  # HF shifts the labels and averages over label tokens
    eager.backward()
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_completion_only_loss_ignores_the_prompt(tmp_path):
    sft = trainer(tmp_path)
    example = sft.train_dataset[0]
    prompt_tokens = len(word_tokenizer()(addition_rows()[0]["prompt"])["input_ids"])
    assert example["completion_mask"][:prompt_tokens] == [0] * prompt_tokens
    assert all(example["completion_mask"][prompt_tokens:])


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    assert_resume_is_exact(trainer, tmp_path)


def test_pretraining_on_packed_text(tmp_path):
    text = [{"text": " ".join(row.values())} for row in addition_rows()]
    sft = trainer(tmp_path, rows=text, packing=True, max_length=40, max_steps=15, learning_rate=1e-2,
                  per_device_train_batch_size=2)  # fmt: skip
    assert set(sft.train_dataset.column_names) >= {"input_ids", "labels", "position_ids"}
    assert max(len(row) for row in sft.train_dataset["input_ids"]) <= 40
    assert len(sft.train_dataset) < len(text)  # several documents per row
    sft.train()
    curve = losses(sft.state.log_history)
    assert curve[-1] < curve[0]


def test_wrong_columns_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="completion"):
        trainer(tmp_path, rows=[{"prompt": "add one to two ."}])
    with pytest.raises(ValueError, match="text"):
        trainer(tmp_path, rows=[{"body": "two plus two"}])


def test_lora_training_updates_only_the_adapters(tmp_path):
    from peft import LoraConfig

    dataset = datasets.Dataset.from_list(addition_rows())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    sft = SFTTrainer(tiny_causal_lm(), args=config(tmp_path, max_steps=3, learning_rate=1e-2), train_dataset=dataset,
                     processing_class=word_tokenizer(), peft_config=lora)  # fmt: skip
    before = {name: p.detach().clone() for name, p in sft.model.named_parameters()}
    sft.train()
    changed = {name for name, p in sft.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed), changed


def test_packed_rows_go_padding_free_with_flash_attention(tmp_path, monkeypatch):
    text = [{"text": " ".join(row.values())} for row in addition_rows()]
    model = tiny_causal_lm()
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    sft = SFTTrainer(model, args=config(tmp_path, packing=True, max_length=40), processing_class=word_tokenizer(),
                     train_dataset=datasets.Dataset.from_list(text))  # fmt: skip
    assert sft.data_collator.padding_free
    assert not trainer(tmp_path, rows=text, packing=True, max_length=40).data_collator.padding_free  # sdpa


def test_trainers_are_top_level_names_loaded_on_first_use():
    import subprocess
    import sys

    probe = "import sys, fastalign; print('transformers.trainer' in sys.modules); print(fastalign.SFTTrainer.__name__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "SFTTrainer"]
    import fastalign
    from fastalign.trainers import DPOConfig, RewardTrainer

    assert fastalign.DPOConfig is DPOConfig and fastalign.RewardTrainer is RewardTrainer


def test_conversational_prompt_completion_trains_on_the_assistant_turn(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": row["prompt"]}],
         "completion": [{"role": "assistant", "content": row["completion"].strip()}]}
        for row in addition_rows()
    ]  # fmt: skip
    sft = trainer(tmp_path, rows=rows, max_steps=2)
    tokenizer = word_tokenizer()
    example = sft.train_dataset[0]
    prompt_text = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert example["completion_mask"][:prompt_tokens] == [0] * prompt_tokens
    assert sum(example["completion_mask"]) > 0
    sft.train()
    assert losses(sft.state.log_history)


def test_num_tokens_counts_the_non_padding_tokens_trained_on(tmp_path):
    # One epoch over the rows: the last logged num_tokens is every row's token count once, padding excluded.
    longer = {"prompt": "what is the answer ? add one to two . the answer is", "completion": " three ."}
    rows = [*addition_rows(), longer]
    sft = trainer(tmp_path, rows=rows, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=3, logging_steps=1)
    lengths = [len(ids) for ids in sft.train_dataset["input_ids"]]
    assert len(set(lengths)) > 1  # some batches are padded
    expected = sum(lengths)
    sft.train()
    counts = [entry["num_tokens"] for entry in sft.state.log_history if "num_tokens" in entry]
    assert counts == sorted(counts) and len(set(counts)) > 1
    assert counts[-1] == expected


def test_label_smoothing_factor_is_the_fused_losss_label_smoothing(tmp_path):
    """The loss equals transformers' LabelSmoother on the full logits (computed in float64)."""
    from transformers.trainer_pt_utils import LabelSmoother

    sft = trainer(tmp_path, label_smoothing_factor=0.5)
    batch = next(iter(sft.get_train_dataloader()))
    batch = {key: value.to(sft.model.device) for key, value in batch.items()}
    with torch.no_grad():  # peaked logits: the smoothed and plain losses then differ by far more than rounding
        sft.model.lm_head.weight.mul_(20)
    fused = sft.compute_loss(sft.model, batch)
    model64 = sft.model.double()
    with torch.no_grad():
        logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = LabelSmoother(epsilon=0.5)({"logits": logits}, batch["labels"], shift_labels=True)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-6)
    plain = SFTTrainer(sft.model, args=config(tmp_path), processing_class=word_tokenizer())
    # without the smoothing the loss is off by far more than the 1e-5 tolerance above
    assert abs(float(plain.compute_loss(model64, batch).detach()) - float(expected)) > 0.1


@pytest.mark.parametrize("value", [-0.1, 1.5, 2])
def test_label_smoothing_factor_out_of_range_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"label_smoothing_factor must be a number in \[0, 1\]"):
        config(tmp_path, label_smoothing_factor=value)
