"""RewardTrainer on tiny random-init sequence-classification models: it learns a toy preference, one step equals
the eager Bradley-Terry step, resume is exact, metrics are logged, LoRA trains the score head, and datasets in
the wrong format are refused with the missing column named."""

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import assert_resume_is_exact, word_tokenizer
from helpers.trainer_reward import preference_rows, tiny_reward_model, trainer

from fastalign.trainers import RewardConfig

METRICS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "min_reward", "mean_reward", "max_reward")


def logged(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if key in entry]


def test_config_defaults_follow_trl():
    args = RewardConfig(output_dir="x", use_cpu=True)
    assert args.learning_rate == 1e-4
    assert args.max_length == 1024
    assert args.disable_dropout is True
    assert args.center_rewards_coefficient is None
    assert args.dataset_num_proc is None and args.pad_token is None and args.eos_token is None
    assert args.gradient_checkpointing is True and args.logging_steps == 10


def test_loss_decreases_and_accuracy_rises_on_a_learnable_task(tmp_path):
    rm = trainer(tmp_path, max_steps=150, learning_rate=1e-3, logging_steps=10)
    rm.train()
    history = rm.state.log_history
    loss, accuracy = logged(history, "loss"), logged(history, "accuracy")
    assert loss[-1] < 0.6 * loss[0], loss
    assert accuracy[-1] >= 0.85 > accuracy[0], accuracy
    # Scores of the whole training set: the trained model prefers the chosen completion of most pairs.
    results = rm.evaluate(rm.train_dataset)
    assert results["eval_accuracy"] >= 0.85, results
    assert results["eval_loss"] < 0.6 * loss[0], results


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
@pytest.mark.parametrize("extras", ["plain", "margin_and_centring"])
def test_one_step_equals_the_eager_step(tmp_path, layout, extras):
    """Loss and every parameter's gradient equal -logsigmoid(chosen - rejected - margin).mean() + centring term
    computed from the model's own logits."""
    with_extras = extras != "plain"
    coef = 0.05 if with_extras else None
    rm = trainer(tmp_path, layout=layout, rows=preference_rows(margin=with_extras), center_rewards_coefficient=coef)
    batch = next(iter(rm.get_train_dataloader()))
    batch = {key: value.to(rm.model.device) for key, value in batch.items()}
    assert ("margin" in batch) == with_extras
    assert batch["input_ids"].shape[0] == 2 * len(batch.get("margin", batch["input_ids"][:4]))
    model = rm.model
    loss = rm.compute_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    chosen, rejected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].chunk(2)
    eager = -F.logsigmoid(chosen - rejected - batch.get("margin", 0.0)).mean()
    if coef is not None:
        eager = eager + coef * ((chosen + rejected) ** 2).mean()
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_score_is_read_at_the_last_real_token(tmp_path):
    """Right padding does not change a row's score: the pad token id reaches the model config."""
    rm = trainer(tmp_path)
    assert rm.model.config.pad_token_id == word_tokenizer().pad_token_id
    batch = next(iter(rm.get_train_dataloader()))
    rm.model.eval()
    with torch.no_grad():
        scores = rm.model(**batch).logits[:, 0]
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            alone = rm.model(input_ids=batch["input_ids"][row : row + 1, :length]).logits[0, 0]
            torch.testing.assert_close(scores[row], alone, rtol=1e-5, atol=1e-5)


def test_metrics_are_logged(tmp_path):
    rows = preference_rows()
    rm = trainer(tmp_path, eval_rows=rows[:8], max_steps=2, eval_strategy="steps", eval_steps=2,
                 per_device_eval_batch_size=4)  # fmt: skip
    rm.train()
    train_logs = [entry for entry in rm.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert set(METRICS) <= set(entry), entry
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["min_reward"] <= entry["mean_reward"] <= entry["max_reward"]
        assert entry["margin"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"], abs=1e-5)
        assert entry["mean_reward"] == pytest.approx((entry["rewards/chosen"] + entry["rewards/rejected"]) / 2)
    tokens = logged(rm.state.log_history, "num_tokens")
    assert 0 < tokens[0] < tokens[1]
    eval_logs = [entry for entry in rm.state.log_history if "eval_loss" in entry]
    assert len(eval_logs) == 1 and {f"eval_{key}" for key in METRICS} <= set(eval_logs[0])
    # The eval metrics are the mean over the eval batches of each batch's statistics, computed here directly.
    rm.model.eval()
    accuracies, margins = [], []
    with torch.no_grad():
        for batch in rm.get_eval_dataloader():
            chosen, rejected = rm.model(**batch).logits[:, 0].chunk(2)
            accuracies.append((chosen > rejected).float().mean().item())
            margins.append((chosen - rejected).mean().item())
    assert eval_logs[0]["eval_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert eval_logs[0]["eval_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    assert_resume_is_exact(trainer, tmp_path)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 2 pairs accumulate to the step of one batch of 4 (the loss is a mean per micro-batch,
    divided by the accumulation steps). Plain SGD: Adam would amplify float-rounding noise in near-zero gradients."""
    big = trainer(tmp_path / "a", max_steps=3, per_device_train_batch_size=4, optim="sgd", learning_rate=0.5)
    big.train()
    accumulated = trainer(tmp_path / "b", max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          optim="sgd", learning_rate=0.5)  # fmt: skip
    accumulated.train()
    assert logged(accumulated.state.log_history, "loss") == pytest.approx(logged(big.state.log_history, "loss"))
    for (name, expected), got in zip(big.model.state_dict().items(), accumulated.model.state_dict().values(),
                                     strict=True):  # fmt: skip
        assert not torch.equal(expected, tiny_reward_model().state_dict()[name]), name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_implicit_prompt_and_conversational_pairs(tmp_path):
    implicit = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in preference_rows()
    ]
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
        }
        for r in preference_rows()
    ]
    tokenizer = word_tokenizer()
    for name, rows in (("implicit", implicit), ("conversational", conversational)):
        rm = trainer(tmp_path / name, rows=rows, max_steps=2)
        assert {"chosen_ids", "rejected_ids"} <= set(rm.train_dataset.column_names)
        example = rm.train_dataset[0]
        assert example["prompt_ids"], name  # the shared prefix became the prompt
        assert example["chosen_ids"][-1] == tokenizer.eos_token_id or name == "conversational"
        rm.train()
        assert all(torch.isfinite(torch.tensor(logged(rm.state.log_history, "loss"))))
    rendered = tokenizer.decode(rm.train_dataset[0]["prompt_ids"] + rm.train_dataset[0]["chosen_ids"])
    assert "<|user|>" in rendered and "<|assistant|>" in rendered


def test_pretokenised_pairs_are_used_as_they_are(tmp_path):
    rows = [
        {"chosen_ids": [2, 9, 10, 3], "rejected_ids": [2, 9, 11, 3]},
        {"chosen_ids": [2, 12, 3], "rejected_ids": [2, 3]},
    ]
    rm = trainer(tmp_path, rows=rows, per_device_train_batch_size=2, max_steps=1)
    assert rm.train_dataset["chosen_ids"] == [row["chosen_ids"] for row in rows]
    batch = next(iter(rm.get_train_dataloader()))
    assert batch["input_ids"][:, 0].tolist() == [2, 2, 2, 2]
    rm.train()


def test_pairs_longer_than_max_length_are_dropped(tmp_path):
    rows = preference_rows()
    rows[0] = {**rows[0], "rejected": " one" * 40}
    with pytest.warns(UserWarning, match="dropped 1 of"):
        rm = trainer(tmp_path, rows=rows)
    assert len(rm.train_dataset) == len(rows) - 1
    with pytest.raises(ValueError, match="max_length"):
        trainer(tmp_path, rows=rows, max_length=3)


def test_dropout_is_disabled_unless_asked_to_keep_it(tmp_path):
    model = tiny_reward_model(attention_dropout=0.5)
    rm = trainer(tmp_path, model=model)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in rm.model.model.layers)
    kept = trainer(tmp_path, model=tiny_reward_model(attention_dropout=0.5), disable_dropout=False)
    assert all(layer.self_attn.attention_dropout == 0.5 for layer in kept.model.model.layers)


def test_lora_trains_the_adapters_and_the_score_head(tmp_path):
    """task_type=None becomes SEQ_CLS (the score head trains in full); with gradient checkpointing, as TRL."""
    peft = pytest.importorskip("peft")
    rm = trainer(tmp_path, peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                 max_steps=3, learning_rate=1e-2, gradient_checkpointing=True)  # fmt: skip
    trainable = {name for name, p in rm.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert any("score" in name for name in trainable), trainable
    assert not any("embed_tokens" in name or "mlp" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in rm.model.named_parameters()}
    rm.train()
    after = dict(rm.model.named_parameters())
    changed = {name for name, p in before.items() if not torch.equal(p, after[name])}
    assert changed and changed <= trainable
    assert any("score" in name for name in changed)
    with pytest.raises(ValueError, match="SEQ_CLS"):
        trainer(tmp_path, peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))


def test_a_model_with_several_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_labels=2"):
        trainer(tmp_path, model=tiny_reward_model(num_labels=2))


def test_wrong_columns_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="'rejected'"):
        trainer(tmp_path, rows=[{"prompt": "add one to two .", "chosen": " three ."}])
    with pytest.raises(ValueError, match="'chosen', 'rejected'"):
        trainer(tmp_path, rows=[{"prompt": "add one to two .", "completion": " three ."}])
