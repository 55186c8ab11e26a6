"""DPOTrainer on tiny random-init models: it learns a toy preference, one step equals the eager (full-logits) TRL
formula in loss and gradients, the reference modes agree, resume is exact, TRL's metrics are logged, and bad
datasets and unimplemented options are refused with the culprit named."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import assert_resume_is_exact, tiny_causal_lm, word_tokenizer
from helpers.trainer_dpo import config, preference_rows, trainer

import fastalign
from fastalign.ops.preference import DPO_LOSS_TYPES
from fastalign.trainers import DPOConfig, DPOTrainer
from fastalign.trainers.dpo import DPOCollator, _dpo_loss_module

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "num_tokens")  # fmt: skip


def first_batch(dpo: DPOTrainer) -> dict[str, torch.Tensor]:
    batch = next(iter(dpo.get_train_dataloader()))
    return {key: value.to(dpo.model.device) for key, value in batch.items()}


def eager_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [2B] and completion lengths [2B] from the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_logps = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), batch["completion_mask"].sum(-1).float()


def trl_loss(logps, ref_logps, lengths, chosen_token_logps_mean, beta, types, weights):
    """TRL 1.16's DPOTrainer loss for sigmoid / hinge / ipo / sft, written out."""
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    c, r = chosen - ref_chosen, rejected - ref_rejected
    loss = 0.0
    for name, weight in zip(types, weights, strict=True):
        if name == "sigmoid":
            per_pair = -F.logsigmoid(beta * (c - r))
        elif name == "hinge":
            per_pair = torch.relu(1 - beta * (c - r))
        elif name == "ipo":
            per_pair = (c / chosen_len - r / rejected_len - 1 / (2 * beta)) ** 2
        elif name == "sft":
            per_pair = -chosen_token_logps_mean.expand(chosen.shape[0])
        loss = loss + per_pair.mean() * weight
    return loss


def test_loss_decreases_and_accuracy_rises_on_a_learnable_task(tmp_path):
    dpo = trainer(tmp_path, max_steps=40, beta=1.0)
    dpo.train()
    history = [entry for entry in dpo.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in history]
    accuracies = [entry["rewards/accuracies"] for entry in history]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert sum(losses[-8:]) / 8 < 0.7 * losses[0], losses
    assert sum(accuracies[-8:]) / 8 > sum(accuracies[:8]) / 8 + 0.3, accuracies


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("types", "weights"), [(["sigmoid"], None), (["sigmoid", "hinge", "ipo", "sft"], [1.0, 0.5, 0.25, 0.3])]
)
def test_one_step_equals_the_eager_trl_formula(tmp_path, layout, types, weights):
    """Loss and every parameter's gradient equal full logits -> log_softmax -> masked sums -> TRL's formula."""
    reference = tiny_causal_lm(layout, seed=1)  # differs from the policy: non-zero log-ratios
    dpo = trainer(tmp_path, layout=layout, ref_model=reference, loss_type=types, loss_weights=weights, beta=0.1)
    model, batch = dpo.model, first_batch(dpo)
    fused = dpo.compute_loss(model, batch)
    fused.backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logps, lengths = eager_logps(model, batch)
    with torch.no_grad():
        ref_logps, _ = eager_logps(reference, batch)
    chosen_tokens = (batch["labels"][: len(logps) // 2, 1:] != -100).sum()
    sft_mean = logps[: len(logps) // 2].sum() / chosen_tokens
    eager = trl_loss(logps, ref_logps, lengths, sft_mean, 0.1, types, weights or [1.0] * len(types))
    eager.backward()
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_loss_type_matches_dpo_loss_on_eager_logps(tmp_path):
    """Each fastalign loss type (with label smoothing where it applies) through the trainer equals
    fastalign.dpo_loss on eagerly computed log-probs (length-averaged for ipo / sigmoid_norm, as TRL)."""
    reference = tiny_causal_lm(seed=1)
    dpo = trainer(tmp_path, ref_model=reference)
    model, batch = dpo.model, first_batch(dpo)
    with torch.no_grad():
        logps, lengths = eager_logps(model, batch)
        ref_logps, _ = eager_logps(reference, batch)
    smoothing = {"sigmoid": 0.1, "robust": 0.1, "exo_pair": 1e-3}
    for name in DPO_LOSS_TYPES:
        args = config(tmp_path, loss_type=name, beta=0.2, label_smoothing=smoothing.get(name, 0.0))
        dpo.loss_fn = _dpo_loss_module(args, dpo._adapter(model))
        with torch.no_grad():
            fused = dpo.compute_loss(model, batch)
        scale = 1 / lengths if name in ("ipo", "sigmoid_norm") else 1.0
        pairs = len(logps) // 2
        policy, ref = logps * scale, ref_logps * scale
        expected, _, _ = fastalign.dpo_loss(
            policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta=0.2, loss_type=name,
            label_smoothing=smoothing.get(name, 0.0),
        )  # fmt: skip
        torch.testing.assert_close(fused, expected.mean(), rtol=1e-5, atol=1e-6, msg=name)


def test_reference_modes_agree(tmp_path):
    """ref_model (a copy), the default frozen copy, precomputed columns, and a LoRA policy with its adapters
    disabled (LoRA B = 0 at init, so the base is the initial policy) all give the initial model's log-probs, and
    stay fixed while the policy trains."""
    from peft import LoraConfig

    initial = tiny_causal_lm()
    explicit = trainer(tmp_path / "a", ref_model=copy.deepcopy(initial))
    default = trainer(tmp_path / "b")
    precomputed = trainer(tmp_path / "c", precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    lora = trainer(tmp_path / "d", peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]))  # fmt: skip
    assert precomputed.ref_model is None and lora.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(precomputed.train_dataset.column_names)
    for dpo in (explicit, default, precomputed, lora):
        dpo.train()  # the policies move; the references must not

    examples = [precomputed.train_dataset[i] for i in range(4)]
    batch = DPOCollator(word_tokenizer().pad_token_id)(examples)
    with torch.no_grad():
        expected, _ = eager_logps(initial, batch)
    stored = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    for dpo in (explicit, default, lora):
        got = torch.cat(dpo.compute_ref_log_probs(batch))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Same policy, same data order, same reference: identical training curves.
    curves = [[e["loss"] for e in dpo.state.log_history if "loss" in e] for dpo in (explicit, default, precomputed)]
    assert curves[0] == pytest.approx(curves[1], rel=1e-5) and curves[0] == pytest.approx(curves[2], rel=1e-5)
    lora_start = next(e for e in lora.state.log_history if "loss" in e)
    assert lora_start["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # B = 0: policy == base at step 1


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    assert_resume_is_exact(trainer, tmp_path)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    """Two micro-batches of 2 pairs step like one batch of 4 (the loss is a mean over pairs, as TRL's).

    Plain SGD: Adam divides each gradient by its own magnitude, so float32 rounding in a near-zero gradient moves
    a weight by up to lr * 0.1 and the comparison would depend on the CPU's vector width; Adam would also hide a
    missing 1 / gradient_accumulation_steps. With SGD at lr 0.5 the two runs' weights differ by an ulp or two of
    the weights (seen: 7e-9) while every weight moves by 3e-5 or more, so a wrong scale cannot pass."""
    options = {"max_steps": 2, "optim": "sgd", "learning_rate": 0.5}
    full = trainer(tmp_path / "a", per_device_train_batch_size=4, **options)
    full.train()
    accumulated = trainer(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **options)
    accumulated.train()
    initial = tiny_causal_lm().state_dict()
    for (name, expected), got in zip(full.model.state_dict().items(), accumulated.model.state_dict().values(),
                                     strict=True):  # fmt: skip
        assert (expected - initial[name]).abs().max() > 1e-5, name  # every weight moved 100 x the tolerance
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_trl_metric_names_are_logged_in_training_and_evaluation(tmp_path):
    dpo = trainer(tmp_path, eval_rows=preference_rows()[:4], max_steps=2)
    dpo.train()
    logged = [entry for entry in dpo.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert set(TRL_METRICS) <= set(entry), entry
        assert 0.0 <= entry["rewards/accuracies"] <= 1.0
        assert entry["rewards/margins"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"], abs=1e-5)
    assert logged[1]["num_tokens"] > logged[0]["num_tokens"] > 0
    metrics = dpo.evaluate()
    for name in TRL_METRICS[:-1]:
        assert f"eval_{name}" in metrics, metrics
    assert "eval_loss" in metrics


def test_truncation_keeps_the_start_and_drops_prompts_that_fill_max_length(tmp_path):
    dpo = trainer(tmp_path, max_length=10)
    for example in dpo.train_dataset:
        assert len(example["prompt_ids"]) < 10
        assert len(example["prompt_ids"]) + len(example["chosen_ids"]) <= 10
    assert len(trainer(tmp_path, max_length=None).train_dataset[0]["chosen_ids"]) == 3  # " two ." + EOS
    with pytest.raises(ValueError, match="max_length"):
        trainer(tmp_path, max_length=3)


def test_wrong_columns_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="rejected"):
        trainer(tmp_path, rows=[{"prompt": "add one to two .", "chosen": " three ."}])
    with pytest.raises(ValueError, match="chosen"):
        trainer(tmp_path, rows=[{"text": "two plus two"}])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"ld_alpha": 0.5}, "ld_alpha"),
        ({"f_divergence_type": "forward_kl"}, "f_divergence_type"),
        ({"use_weighting": True}, "use_weighting"),
        ({"sync_ref_model": True}, "sync_ref_model"),
        ({"truncation_mode": "keep_end"}, "truncation_mode"),
        ({"loss_type": "aot"}, "aot"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"beta": 0.0}, "beta"),
    ],
)
def test_unimplemented_or_invalid_options_are_refused_at_config_time(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


def test_config_defaults_follow_trl(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type="ipo", use_cpu=True)
    assert args.loss_type == ["ipo"] and args.learning_rate == 1e-6 and args.beta == 0.1
    assert args.max_length == 1024 and args.truncation_mode == "keep_start" and args.disable_dropout
    assert not args.precompute_ref_log_probs and args.pad_to_multiple_of is None and args.label_smoothing == 0.0


def test_conversational_pairs_with_an_implicit_prompt(tmp_path):
    """Message lists whose shared first turn is the prompt: the prompt is extracted and the pair trains."""
    rows = [
        {"chosen": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}],
         "rejected": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["rejected"]}]}
        for row in preference_rows()
    ]  # fmt: skip
    dpo = trainer(tmp_path, rows=rows, max_steps=2)
    example = dpo.train_dataset[0]
    tokenizer = word_tokenizer()
    prompt_text = tokenizer.apply_chat_template(rows[0]["chosen"][:1], tokenize=False, add_generation_prompt=True)
    assert example["prompt_ids"] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert example["chosen_ids"] != example["rejected_ids"]
    dpo.train()
    assert any("rewards/accuracies" in entry for entry in dpo.state.log_history)
