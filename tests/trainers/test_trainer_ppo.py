"""PPOTrainer on a tiny random-init model: one update's policy and value losses (and gradients) equal the eager
full-logits computation, the rollout's per-token rewards, GAE and whitening match hand-written references, the
adaptive β of the KL-penalty objective doubles and halves, the mean score rises on a toy rule reward with both
objectives, and bad configurations or datasets are refused."""

import datasets
import pytest
import torch
from helpers.tiny import tiny_causal_lm, word_tokenizer
from helpers.trainer_ppo import PROMPTS, blue_reward, config, trainer

from fastalign.trainers.ppo import PPOTrainer, adapt_kl_coef, masked_whiten


def rollout(ppo: PPOTrainer):
    """The full rollout batch (before it is cut into micro-batches)."""
    return ppo._generate_and_score(next(iter(ppo.get_train_dataloader())), "train")


def eager_losses(ppo, inputs, objective="clip", beta=None):
    """TRL's PPO losses from full logits: masked token means of the clipped surrogate (or the KL-penalty
    objective) and of the clipped value loss."""
    args = ppo.args
    policy, value_model = ppo.model.policy, ppo.model.value_model
    completion = inputs.completion_ids.shape[1]
    ids, attention, positions = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, -completion - 1 : -1].float() / args.temperature, dim=-1)
    logp = logp.gather(-1, inputs.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = inputs.completion_mask.float()
    advantages, old = inputs.advantages, inputs.old_logps
    ratio = torch.exp(logp - old)
    if objective == "clip":
        per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))
    else:
        per_token = -advantages * ratio + beta * (ratio - 1 - (logp - old))  # k3 of KL(π_old‖π)
    policy_loss = (per_token * mask).sum() / mask.sum()
    values = value_model(ids, attention, position_ids=positions)[:, -completion - 1 : -1]
    old_values, returns = inputs.old_values, inputs.returns
    clipped = old_values + (values - old_values).clamp(-args.cliprange_value, args.cliprange_value)
    per_token = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    value_loss = 0.5 * (per_token * mask).sum() / mask.sum()
    return policy_loss, value_loss


@pytest.mark.parametrize("objective", ["clip", "kl_penalty"])
def test_one_update_equals_the_eager_full_logits_losses(tmp_path, objective):
    ppo = trainer(tmp_path, temperature=0.8, objective=objective, kl_penalty_coef=0.3, gradient_accumulation_steps=2)
    inputs = ppo._prepare_inputs(next(iter(ppo.get_train_dataloader())))
    model = ppo.model
    with torch.no_grad():  # move off the sampling policy, so the ratios and both clips are exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, metrics = ppo.compute_loss(model, inputs, return_outputs=True)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    policy_loss, value_loss = eager_losses(ppo, inputs, objective, beta=0.3)
    eager = (policy_loss + ppo.args.vf_coef * value_loss) / 2
    eager.backward()
    torch.testing.assert_close(metrics["loss/policy_avg"], policy_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["loss/value_avg"], value_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    if objective == "clip":
        assert float(metrics["policy/clipfrac_avg"]) > 0 and float(metrics["val/clipfrac_avg"]) > 0
    for name, p in model.named_parameters():
        error = (fused_grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-6)
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
    assert any(name.startswith("value_model.") and p.grad.abs().sum() > 0 for name, p in model.named_parameters())


def test_rewards_carry_the_kl_per_token_and_the_score_at_the_last_token(tmp_path):
    ppo = trainer(tmp_path, ref_model=tiny_causal_lm(seed=1), kl_coef=0.1, missing_eos_penalty=1.0)
    inputs = rollout(ppo)
    mask = inputs.completion_mask.bool()
    truncated = ~(inputs.completion_ids == ppo.eos_token_id).any(dim=1)
    assert truncated.any() and (~truncated).any()
    texts = ppo.processing_class.batch_decode(
        [ids[m].tolist() for ids, m in zip(inputs.completion_ids, mask, strict=True)], skip_special_tokens=True
    )
    expected_scores = torch.tensor(blue_reward(texts)) - 1.0 * truncated.float()
    torch.testing.assert_close(inputs.scores, expected_scores)
    expected = -0.1 * (inputs.old_logps - inputs.ref_logps)  # k1: log π_old − log π_ref
    last = mask.sum(dim=1) - 1
    expected[torch.arange(len(last)), last] += expected_scores
    torch.testing.assert_close(inputs.rewards[mask], expected[mask])
    assert (inputs.rewards[~mask] == 0).all()
    assert (inputs.ref_logps - inputs.old_logps)[mask].abs().max() > 0.1  # a different reference model


def reference_gae(rewards, values, mask, gamma, lam):
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[row, t]]
        running, next_value = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            advantages[row, t] = running
            next_value = values[row, t]
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_gae_advantages_and_returns_match_a_reference_loop(tmp_path, whiten_rewards):
    ppo = trainer(tmp_path, gamma=0.9, lam=0.8, whiten_advantages=False, whiten_rewards=whiten_rewards)
    inputs = rollout(ppo)
    mask = inputs.completion_mask.float()
    rewards = masked_whiten(inputs.rewards, mask, shift_mean=False) if whiten_rewards else inputs.rewards
    advantages, returns = reference_gae(rewards, inputs.old_values, mask, 0.9, 0.8)
    assert inputs.old_values[mask.bool()].abs().max() > 0  # the value model's own values, not zeros
    torch.testing.assert_close(inputs.advantages, advantages, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.returns, returns, rtol=1e-5, atol=1e-6)


def test_masked_whiten_matches_trl():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = values[mask.bool()]
    expected = (values - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(masked_whiten(values, mask)[mask.bool()], expected[mask.bool()])
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False)[mask.bool()], (expected + kept.mean())[mask.bool()]
    )
    assert (masked_whiten(values, mask)[~mask.bool()] == 0).all()


def test_advantages_are_whitened_by_default(tmp_path):
    inputs = rollout(trainer(tmp_path))
    kept = inputs.advantages[inputs.completion_mask.bool()]
    assert abs(float(kept.mean())) < 1e-5 and abs(float(kept.std()) - 1) < 1e-3


def test_adaptive_kl_coefficient_doubles_and_halves():
    beta = torch.tensor(0.5)
    assert float(adapt_kl_coef(beta, torch.tensor(0.016), target_kl=0.01)) == 1.0  # > 1.5 × target: doubled
    assert float(adapt_kl_coef(beta, torch.tensor(0.006), target_kl=0.01)) == 0.25  # < target / 1.5: halved
    for kl in (0.007, 0.01, 0.014):
        assert float(adapt_kl_coef(beta, torch.tensor(kl), target_kl=0.01)) == 0.5


def test_the_trainer_adapts_beta_from_the_measured_kl_after_each_update(tmp_path):
    ppo = trainer(tmp_path, objective="kl_penalty", kl_penalty_coef=0.5, target_kl=0.01)
    micro_batches = [ppo._prepare_inputs(next(iter(ppo.get_train_dataloader())))]
    ppo._adapt_kl_penalty(micro_batches)  # the policy has not moved: KL 0 < target / 1.5
    assert float(ppo.kl_penalty_beta) == 0.25
    with torch.no_grad():
        for p in ppo.model.policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ppo._adapt_kl_penalty(micro_batches)
    measured = ppo._metrics["train"]["objective/kl_penalty_measured"]
    assert float(measured[0]) == 0 and float(measured[1]) > 0.015
    assert float(ppo.kl_penalty_beta) == 0.5


@pytest.mark.parametrize("objective", ["clip", "kl_penalty"])
def test_mean_score_rises_on_a_toy_rule_reward(tmp_path, objective):
    ppo = trainer(
        tmp_path,
        objective=objective,
        max_steps=48,
        learning_rate=3e-2,
        temperature=1.0,
        per_device_train_batch_size=16,
        target_kl=0.05,
    )
    ppo.train()
    history = ppo.state.log_history
    scores = [entry["objective/scores"] for entry in history if "objective/scores" in entry]
    assert len(scores) == 12  # 48 optimiser steps = 12 rollouts × 4 PPO epochs
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.2, scores
    logged = set().union(*history)
    expected = {
        "objective/kl",
        "objective/rlhf_reward",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/approxkl_avg",
    }
    expected |= {"policy/clipfrac_avg"} if objective == "clip" else {"objective/kl_penalty_beta"}
    assert expected <= logged
    if objective == "kl_penalty":  # β adapted (up and down) from its initial 1.0
        betas = {entry["objective/kl_penalty_beta"] for entry in history if "objective/kl_penalty_beta" in entry}
        assert len(betas) > 2


def test_kl_in_the_loss_and_saving(tmp_path):
    ppo = trainer(tmp_path, kl_in_reward=False, kl_coef=0.1, max_steps=4)
    inputs = rollout(ppo)
    assert (inputs.rewards.sum(dim=1) == inputs.scores).all()  # the reward holds the score only
    ppo.train()
    assert any("objective/kl_loss" in entry for entry in ppo.state.log_history)
    ppo.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").exists()
    assert (tmp_path / "saved" / "value_model.safetensors").exists()


def test_configuration_and_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        config(tmp_path, objective="reinforce")
    with pytest.raises(ValueError, match="kl_estimator"):
        config(tmp_path, kl_estimator="k2")
    with pytest.raises(ValueError, match="num_ppo_epochs"):
        config(tmp_path, num_ppo_epochs=0)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        config(tmp_path, num_generations=3)
    with pytest.raises(ValueError, match="target_kl"):
        config(tmp_path, target_kl=0.0)
    with pytest.raises(ValueError, match="lam"):
        config(tmp_path, lam=1.5)
    with pytest.raises(ValueError, match="cliprange"):
        config(tmp_path, cliprange=1.0)
    with pytest.raises(ValueError, match="prompt"):
        trainer(tmp_path, rows=[{"question": "what is one plus one ?"}])
    with pytest.raises(ValueError, match=r"reward_funcs or args\.reward_model_path"):
        PPOTrainer(
            tiny_causal_lm(),
            args=config(tmp_path),
            train_dataset=datasets.Dataset.from_list(PROMPTS),
            processing_class=word_tokenizer(),
        )


def test_each_rollout_samples_from_the_policy_after_the_last_optimizer_step(tmp_path):
    from helpers.engines import OwnCopyEngine, RecordWeights

    model, tokenizer = tiny_causal_lm(), word_tokenizer()
    engine = OwnCopyEngine(model, tokenizer)
    ppo = PPOTrainer(
        model,
        reward_funcs=blue_reward,
        args=config(tmp_path, max_steps=6, num_ppo_epochs=2),
        train_dataset=datasets.Dataset.from_list(PROMPTS),
        processing_class=tokenizer,
        rollout_engine=engine,
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = RecordWeights(model)
    ppo.add_callback(record)
    ppo.train()
    assert len(engine.sampled_with) == 3 and engine.syncs == 2  # a rollout every 2 optimizer steps
    policies = [initial, *record.after_step]
    for k, sampled in enumerate(engine.sampled_with):
        for name, value in sampled.items():
            torch.testing.assert_close(value, policies[2 * k][name], rtol=0, atol=0, msg=f"rollout {k}: {name}")
    assert not torch.equal(engine.sampled_with[-1]["lm_head.weight"], initial["lm_head.weight"])
