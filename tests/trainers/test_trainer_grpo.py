"""GRPOTrainer on a tiny random-init model: one step equals the eager full-logits computation of TRL's loss,
the mean reward rises on a toy rule reward, DAPO's dynamic sampling keeps only informative groups, and bad
configurations or datasets are refused."""

import math

import datasets
import pytest
import torch
from helpers.engines import OwnCopyEngine, RecordWeights
from helpers.tiny import tiny_causal_lm, word_tokenizer
from helpers.trainer_grpo import PROMPTS, blue_reward, config, id_hash_reward, trainer

from fastalign.ops import reference_losses
from fastalign.trainers.grpo import GRPOTrainer


def constant_for_even_numbers(completions, completion_ids, number, **kwargs):
    return [1.0 if n % 2 == 0 else float(sum(ids) % 7) for n, ids in zip(number, completion_ids, strict=True)]


def eager_loss(model, inputs, temperature, epsilon_low, epsilon_high):
    """TRL's DAPO loss from full logits: token ratio, clip, token sum over the generation's tokens."""
    completion = inputs.completion_ids.shape[1]
    logits = model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).logits
    logp = torch.log_softmax(logits[:, -completion - 1 : -1].float() / temperature, dim=-1)
    logp = logp.gather(-1, inputs.completion_ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - inputs.old_logps)
    advantages = inputs.advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages)
    mask = inputs.completion_mask.float()
    return (per_token * mask).sum() / inputs.generation_tokens


@pytest.mark.parametrize("iterations", [1, 2])
def test_one_step_equals_the_eager_full_logits_loss(tmp_path, iterations):
    grpo = trainer(tmp_path, temperature=0.8, epsilon_high=0.28, num_iterations=iterations)
    rows = next(iter(grpo.get_train_dataloader()))
    inputs = grpo._prepare_inputs(rows)
    model = grpo.model
    with torch.no_grad():  # move off the sampling policy, so the ratios and the clip are exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = grpo.compute_loss(model, inputs)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = eager_loss(model, inputs, 0.8, 0.2, 0.28)
    eager.backward()
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        error = (fused_grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-6)
        assert error < 1e-4, f"{name}: relative error {error:.2e}"


NEW_LOSS_TYPES = {
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.1},
    "sapo": {"loss_type": "sapo", "sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.3},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.05},
    "vespo": {"loss_type": "vespo", "vespo_k_neg": 2.5},
    "off-policy-mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.0},
    "top-entropy": {"loss_type": "grpo", "top_entropy_quantile": 0.3},
    "bias-corrected-kl": {"loss_type": "dapo", "beta": 0.5, "use_bias_correction_kl": True},
}


@pytest.mark.parametrize("case", NEW_LOSS_TYPES)
def test_one_step_of_the_newer_loss_types_equals_the_reference_on_eager_logps(tmp_path, case):
    """cispo / vespo normalise by the generation's tokens (as dapo), sapo / luspo per micro-batch over the
    accumulation steps (as grpo), and each field reaches the loss: the fused step equals the float32
    reference of the formula on full-logits log-probs (and entropies)."""
    fields = NEW_LOSS_TYPES[case]
    loss_type = fields["loss_type"]
    grpo = trainer(tmp_path, temperature=0.8, gradient_accumulation_steps=2, **fields)
    inputs = grpo._prepare_inputs(next(iter(grpo.get_train_dataloader())))
    model = grpo.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = grpo.compute_loss(model, inputs)
    completion = inputs.completion_ids.shape[1]
    logits = model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).logits
    logp_all = torch.log_softmax(logits[:, -completion - 1 : -1].float() / 0.8, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logp = logp_all.gather(-1, inputs.completion_ids.unsqueeze(-1)).squeeze(-1)
    options = grpo.args.policy_loss_options()
    options = {name: getattr(options, name) for name in options.__dataclass_fields__}
    tensors = (logp, inputs.old_logps, inputs.advantages, inputs.completion_mask)
    extra = {"entropy": entropy, "ref_logps": inputs.ref_logps}
    if loss_type in ("cispo", "vespo", "dapo"):
        # The generation's tokens per optimiser step over its micro-batches: the step's losses add up to its mean.
        tokens = inputs.generation_tokens * 2 / grpo.args.steps_per_generation
        expected = reference_losses.policy_loss(*tensors, **extra, num_items_in_batch=tokens, **options)
    else:
        expected = reference_losses.policy_loss(*tensors, **extra, **options) / 2
    torch.testing.assert_close(fused, expected.to(fused.dtype), rtol=1e-5, atol=1e-6)


def test_old_logps_are_the_policys_logps_at_sampling_time(tmp_path):
    grpo = trainer(tmp_path, temperature=0.7)
    inputs = grpo._prepare_inputs(next(iter(grpo.get_train_dataloader())))
    recomputed = grpo._completion_logps(grpo.model, inputs)
    mask = inputs.completion_mask.bool()
    torch.testing.assert_close(inputs.old_logps[mask], recomputed[mask], rtol=1e-4, atol=1e-4)


def test_mean_reward_rises_on_a_toy_rule_reward(tmp_path):
    grpo = trainer(tmp_path, max_steps=30, learning_rate=3e-2, temperature=1.0, per_device_train_batch_size=16)
    grpo.train()
    rewards = [entry["reward"] for entry in grpo.state.log_history if "reward" in entry]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards


def test_dynamic_sampling_keeps_groups_whose_rewards_differ(tmp_path):
    grpo = trainer(tmp_path, reward=constant_for_even_numbers, dynamic_sampling=True, per_device_train_batch_size=16)
    inputs = grpo._prepare_inputs(next(iter(grpo.get_train_dataloader())))
    advantages = inputs.advantages.view(-1, 4)
    assert advantages.shape[0] == 4 and bool((advantages.abs().sum(dim=1) > 0).all())
    assert grpo._metrics["train"]["dynamic_sampling/kept_groups"] == [4.0]


def test_kl_to_a_reference_model(tmp_path):
    grpo = trainer(tmp_path, beta=0.04)
    inputs = grpo._prepare_inputs(next(iter(grpo.get_train_dataloader())))
    mask = inputs.completion_mask.bool()
    torch.testing.assert_close(inputs.ref_logps[mask], inputs.old_logps[mask], rtol=1e-4, atol=1e-4)
    grpo.train()
    assert any("kl_mean" in entry for entry in grpo.state.log_history)


def test_configuration_and_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        config(tmp_path, per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type="ppo")
    with pytest.raises(ValueError, match="prompt"):
        trainer(tmp_path, rows=[{"question": "what is one plus one ?"}])
    with pytest.raises(ValueError, match="reward_weights"):
        trainer(tmp_path, reward=[blue_reward, id_hash_reward], reward_weights=[1.0])


@pytest.mark.parametrize("iterations", [1, 2])
def test_each_generation_samples_from_the_policy_after_the_last_optimizer_step(tmp_path, iterations):
    model, tokenizer = tiny_causal_lm(), word_tokenizer()
    engine = OwnCopyEngine(model, tokenizer)
    grpo = GRPOTrainer(
        model,
        reward_funcs=id_hash_reward,
        args=config(tmp_path, max_steps=4, num_iterations=iterations),
        train_dataset=datasets.Dataset.from_list(PROMPTS),
        processing_class=tokenizer,
        rollout_engine=engine,
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = RecordWeights(model)
    grpo.add_callback(record)
    grpo.train()
    rounds = 4 // iterations
    assert len(engine.sampled_with) == rounds
    assert engine.syncs == rounds - 1  # once per round after an optimizer step, not once per step
    policies = [initial, *record.after_step]
    for k, sampled in enumerate(engine.sampled_with):
        policy = policies[k * iterations]  # the policy after the optimizer step that precedes round k
        for name, value in sampled.items():
            torch.testing.assert_close(value, policy[name], rtol=0, atol=0, msg=f"round {k}: {name}")
    last, first = engine.sampled_with[-1], engine.sampled_with[0]
    assert any(not torch.equal(last[n], first[n]) for n in first), "the policy never moved: the test shows nothing"


def test_log_completions_prints_prompts_completions_rewards_and_advantages(tmp_path, capsys):
    grpo = trainer(tmp_path, log_completions=True, num_completions_to_print=3, max_steps=2)
    grpo.train()
    lines = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("step ")]
    assert len(headers) == 2, lines  # one table per logging step
    header = [name.strip() for name in lines[headers[-1]].split(" | ")]
    assert header == ["step", "prompt", "completion", "blue_reward", "advantage"]
    rows = [line.split(" | ") for line in lines[headers[-1] + 2 :][:3]]
    assert all(len(row) == 5 and row[0].strip() == "1" and row[1].startswith("what is") for row in rows), rows
    assert not lines[headers[-1] + 5 :] or " | " not in lines[headers[-1] + 5]  # num_completions_to_print rows
    for row in rows:  # the printed reward is the reward function's (4 significant digits)
        assert float(row[3]) == pytest.approx(blue_reward([row[2].strip()])[0], rel=1e-3, abs=1e-4)
    quiet = trainer(tmp_path, max_steps=1)
    quiet.train()
    assert "| completion" not in capsys.readouterr().out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_an_unscorable_completion_gets_zero_advantage_and_leaves_the_baseline(tmp_path, scale):
    """Every reward function returned None for it (reward NaN): as TRL, it is out of its group's mean and std
    and its advantage is 0; without NaN the advantages are group_advantages'."""
    from fastalign import group_advantages
    from fastalign.trainers.grpo import _advantages_of

    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0, 2.0, 2.0, 5.0, 1.0], dtype=torch.float64)
    got = _advantages_of(rewards, 4, scale)
    valid = [1.0, 3.0, 0.0]  # group 1 without its NaN
    expected = torch.tensor(valid, dtype=torch.float64) - sum(valid) / 3
    if scale == "group":
        expected = expected / (torch.tensor(valid, dtype=torch.float64).std() + 1e-4)
    elif scale == "batch":
        expected = expected / (rewards[~rewards.isnan()].std() + 1e-4)
    assert got[1] == 0
    torch.testing.assert_close(got[[0, 2, 3]], expected.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        got[4:],
        group_advantages(rewards[4:], 4, scale=scale)
        if scale != "batch"
        else (rewards[4:] - 2.5) / (rewards[~rewards.isnan()].std() + 1e-4),
    )
    clean = rewards.nan_to_num(2.0)
    torch.testing.assert_close(_advantages_of(clean, 4, scale), group_advantages(clean, 4, scale=scale))


def test_training_goes_on_when_a_completion_is_unscorable(tmp_path):
    def none_for_the_first(completions, **kwargs):
        return [None] + [0.1 * i for i in range(1, len(completions))]

    grpo = trainer(tmp_path, reward=none_for_the_first, max_steps=2)
    grpo.train()  # a NaN reward used to make its whole group's advantages, and the loss, NaN
    assert all(math.isfinite(entry["loss"]) for entry in grpo.state.log_history if "loss" in entry)
