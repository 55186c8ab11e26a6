"""Every trainer config field is honoured, or refused when set: the refusals, with the field named, before any
model loads; and an inventory that maps each field the configs declare to the test showing it is honoured or to
its refusal, so that a new field cannot go unaudited."""

import ast
import copy
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import ClassVar

import datasets
import pytest
import torch
from helpers import trainer_dpo, trainer_grpo, trainer_ppo, trainer_reward, trainer_sft
from helpers.tiny import addition_rows

from fastalign.trainers import DPOTrainer
from fastalign.trainers.configs import DistillConfig, DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig

BASE = {"output_dir": "unused", "use_cpu": True, "report_to": [], "bf16": False}
CONFIGS = (SFTConfig, RewardConfig, DPOConfig, GRPOConfig, PPOConfig, DistillConfig)
ONLINE = (GRPOConfig, PPOConfig, DistillConfig)
ONLINE_REFUSED = [
    ("train_sampling_strategy", "group_by_length"),
    ("dataloader_num_workers", 2),
    ("dataloader_persistent_workers", True),
    ("include_num_input_tokens_seen", "all"),
    ("auto_find_batch_size", True),
    ("neftune_noise_alpha", 5.0),
    ("remove_unused_columns", True),
    ("label_smoothing_factor", 0.1),
]

# (config, field, value, what the message says): refused when the config is built.
REFUSED = [
    *[(c, "per_device_train_batch_size", 0, "per_device_train_batch_size must be an int >= 1") for c in CONFIGS],
    *[(c, "learning_rate", -1e-5, "learning_rate must be a finite number >= 0") for c in CONFIGS],
    (SFTConfig, "learning_rate", math.nan, "learning_rate must be a finite number >= 0"),
    (SFTConfig, "per_device_eval_batch_size", 0, "per_device_eval_batch_size must be an int >= 1"),
    (SFTConfig, "gradient_accumulation_steps", 0, "gradient_accumulation_steps must be an int >= 1"),
    (SFTConfig, "label_smoothing_factor", 2, r"label_smoothing_factor must be a number in \[0, 1\]"),
    (SFTConfig, "label_smoothing_factor", -0.1, r"label_smoothing_factor must be a number in \[0, 1\]"),
    (RewardConfig, "center_rewards_coefficient", -1.0, "center_rewards_coefficient must be None or a finite"),
    (RewardConfig, "label_smoothing_factor", 0.1, "label_smoothing_factor=0.1: RewardTrainer does not honour"),
    (RewardConfig, "backend", "triton", "backend='triton': RewardTrainer does not honour"),
    (DPOConfig, "label_smoothing_factor", 0.1, "DPO's own label smoothing is the label_smoothing field"),
    (DPOConfig, "f_alpha_divergence_coef", 0.3, "f_alpha_divergence_coef=0.3: DPOTrainer does not honour"),
    (DPOConfig, "ref_model_mixup_alpha", 0.5, "ref_model_mixup_alpha=0.5: DPOTrainer does not honour"),
    (DPOConfig, "ref_model_sync_steps", 64, "ref_model_sync_steps=64: DPOTrainer does not honour"),
    (GRPOConfig, "beta", -0.5, "beta must be a finite number >= 0"),
    (GRPOConfig, "epsilon", -0.1, "epsilon must be a finite number >= 0"),
    (GRPOConfig, "entropy_coef", -0.1, "entropy_coef must be a finite number >= 0"),
    (GRPOConfig, "epsilon_high", -0.1, "epsilon_high must be None or a number >= 0"),
    (GRPOConfig, "num_completions_to_print", 0, "num_completions_to_print must be None or >= 1"),
    (PPOConfig, "dataset_num_proc", 4, "dataset_num_proc=4: PPOTrainer does not honour"),
    (DistillConfig, "lmbda", 1.5, r"lmbda must be a finite number in \[0, 1\]"),
    (DistillConfig, "beta", 1.5, r"beta must be a finite number in \[0, 1\]"),
    (DistillConfig, "temperature", 0.0, "temperature must be a finite number > 0"),
    (DistillConfig, "max_completion_length", 0, "max_completion_length must be an int >= 1"),
    (DistillConfig, "num_completions_to_print", 0, "num_completions_to_print must be None or >= 1"),
    (DistillConfig, "backend", "cuda", "the distillation loss has torch and Triton kernels only"),
    (PPOConfig, "stop_token", "</s>", "stop_token must be None or 'eos'"),
    (DPOConfig, "router_aux_loss_coef", 0.1, "router_aux_loss_coef=0.1: fastalign's DPOTrainer does not implement"),
    (DPOConfig, "ld_alpha", 0.5, "ld_alpha=0.5: fastalign's DPOTrainer does not implement"),
    (DPOConfig, "f_divergence_type", "js_divergence", "f_divergence_type='js_divergence': fastalign's"),
    (DPOConfig, "use_weighting", True, "use_weighting=True: fastalign's DPOTrainer does not implement"),
    (DPOConfig, "activation_offloading", True, "activation_offloading=True: fastalign's DPOTrainer does not"),
    (DPOConfig, "sync_ref_model", True, "sync_ref_model=True: fastalign's DPOTrainer does not implement"),
    (DPOConfig, "truncation_mode", "keep_end", "truncation_mode='keep_end': fastalign's DPOTrainer does not"),
    *[
        (c, name, value, f"{name}=.*: {c.__name__[:-6]}Trainer does not honour")
        for c in ONLINE
        for name, value in ONLINE_REFUSED
    ],
]


@pytest.mark.parametrize(
    ("config", "name", "value", "message"), REFUSED, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in REFUSED]
)
def test_refused_when_the_config_is_built(config, name, value, message):
    with pytest.raises(ValueError, match=message):
        config(**{**BASE, name: value})


def test_grpo_eval_batches_are_per_device_eval_batch_size_completions(tmp_path):
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size \(6 completions\) must be a multiple of"):
        GRPOConfig(**BASE, num_generations=4, per_device_eval_batch_size=6, eval_strategy="steps", eval_steps=1)
    grpo = trainer_grpo.trainer(tmp_path, per_device_eval_batch_size=8)
    rows = next(iter(grpo.get_eval_dataloader(grpo.train_dataset)))
    assert len(rows) == 8 and len({row["number"] for row in rows}) == 2  # two whole groups of 4


@pytest.mark.parametrize("config", CONFIGS)
def test_defaults_are_accepted(config):
    config(**BASE)


# ------------------------------------------------------------------------------------------ honoured fields


class RecordingEngine:
    """Wraps a trainer's engine; records the prompts and the sampling settings of each generate call."""

    def __init__(self, engine):
        self.engine, self.calls, self.batches = engine, [], []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        self.batches.append(self.engine.generate(prompts, params))
        return self.batches[-1]

    def sync_weights(self, model):
        self.engine.sync_weights(model)


def first_inputs(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_prompt_length": 3}


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_sampling_fields_and_max_prompt_length_reach_the_engine(tmp_path, kind):
    from helpers.tiny import word_tokenizer

    from fastalign.data import tokenize_prompt

    extra = {"min_p": 0.05, "repetition_penalty": 1.2, "max_completion_length": 5} if kind == "grpo" else {}
    extra |= {"response_length": 5} if kind == "ppo" else {}
    trainer = (trainer_grpo if kind == "grpo" else trainer_ppo).trainer(tmp_path, **SAMPLING, **extra)
    trainer.engine = RecordingEngine(trainer.engine)
    first_inputs(trainer)
    ((prompts, params),) = trainer.engine.calls
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 5)
    assert params.max_completion_length == 5
    if kind == "grpo":
        assert (params.min_p, params.repetition_penalty) == (0.05, 1.2)
    rows = trainer_grpo.PROMPTS if kind == "grpo" else trainer_ppo.PROMPTS
    full = [tokenize_prompt(row, word_tokenizer())["prompt_ids"] for row in rows]
    assert min(len(ids) for ids in full) > 3
    endings = [ids[-3:] for ids in full]
    assert all(p in endings for p in prompts), prompts  # every prompt keeps its last max_prompt_length tokens


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "ppo"])
def test_backend_reaches_the_fused_ops(tmp_path, kind, monkeypatch):
    """Every backend choice the fused ops make during a loss is the configured one."""
    import fastalign.ops.dispatch
    import fastalign.ops.logprobs
    import fastalign.ops.policy
    import fastalign.ops.preference

    asked = []
    real = fastalign.ops.dispatch.resolve_backend

    def record(backend, *args, **kwargs):
        asked.append(backend)
        return real("torch", *args, **kwargs)

    for module in (fastalign.ops.dispatch, fastalign.ops.logprobs, fastalign.ops.policy, fastalign.ops.preference):
        monkeypatch.setattr(module, "resolve_backend", record)
    module = {"sft": trainer_sft, "dpo": trainer_dpo, "grpo": trainer_grpo, "ppo": trainer_ppo}
    trainer = module[kind].trainer(tmp_path, backend="triton")
    if kind in ("sft", "dpo"):
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(trainer.model, {k: v.to(trainer.model.device) for k, v in batch.items()})
    else:
        trainer.compute_loss(trainer.model, first_inputs(trainer))
    assert asked and set(asked) == {"triton"}, asked


def test_an_unknown_backend_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\)"):
        SFTConfig(**BASE, backend="cuBLAS")


@pytest.mark.parametrize(("kind", "value"), [("grpo", True), ("ppo", False), ("dpo", False), ("dpo", True)])
def test_disable_dropout(tmp_path, kind, value, monkeypatch):
    from helpers import tiny

    made = tiny.tiny_causal_lm

    def with_dropout(*args, **kwargs):
        model = made(*args, **kwargs)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        return model

    module = {"grpo": trainer_grpo, "ppo": trainer_ppo, "dpo": trainer_dpo}[kind]
    monkeypatch.setattr(module, "tiny_causal_lm", with_dropout)
    trainer = module.trainer(tmp_path, disable_dropout=value)
    policy = trainer.policy if kind == "ppo" else trainer.model
    assert {layer.self_attn.attention_dropout for layer in policy.model.layers} == {0.0 if value else 0.1}


def test_grpo_loss_fields_reach_the_loss(tmp_path):
    options = {
        "epsilon": 0.1,
        "epsilon_high": 0.3,
        "beta": 0.02,
        "entropy_coef": 0.01,
        "importance_sampling_level": "sequence",
        "loss_type": "grpo",
        "temperature": 0.9,
    }
    grpo = trainer_grpo.trainer(tmp_path, **options)
    loss = grpo._loss_module()
    expected = {
        "clip_eps_low": 0.1,
        "clip_eps_high": 0.3,
        "kl_coef": 0.02,
        "entropy_coef": 0.01,
        "importance_sampling_level": "sequence",
        "loss_type": "grpo",
    }
    assert {name: getattr(loss.options, name) for name in expected} == expected
    assert loss.options == grpo.args.policy_loss_options()
    assert loss.temperature == 0.9
    vespo = {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5}
    grpo = trainer_grpo.trainer(tmp_path, loss_type="vespo", **vespo)
    assert {name: getattr(grpo._loss_module().options, name) for name in vespo} == vespo


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_scale_rewards_and_mask_truncated_completions(tmp_path, scale):
    from fastalign import group_advantages

    grpo = trainer_grpo.trainer(
        tmp_path, reward=trainer_grpo.id_hash_reward, scale_rewards=scale, mask_truncated_completions=True
    )
    grpo.engine = RecordingEngine(grpo.engine)
    inputs = grpo._generate_and_score(next(iter(grpo.get_train_dataloader())), "train")  # before the shuffle
    batch = grpo.engine.batches[0]
    ids = [i[m.bool()].tolist() for i, m in zip(batch.completion_ids, batch.completion_mask, strict=True)]
    rewards = torch.tensor(trainer_grpo.id_hash_reward(None, ids))
    torch.testing.assert_close(inputs.advantages.cpu(), group_advantages(rewards, 4, scale=scale))
    if scale == "none":  # Dr. GRPO: the reward minus its group's mean, unscaled
        centred = rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)
        torch.testing.assert_close(inputs.advantages.cpu(), centred)
    assert batch.truncated.any() and not batch.truncated.all()
    mask = inputs.completion_mask.cpu()
    assert (mask[batch.truncated] == 0).all()
    assert torch.equal(mask[~batch.truncated], batch.completion_mask[~batch.truncated])


def test_grpo_generation_batch_feeds_steps_per_generation_micro_batches(tmp_path):
    grpo = trainer_grpo.trainer(tmp_path, steps_per_generation=2, per_device_train_batch_size=4, max_steps=4)
    grpo.engine = RecordingEngine(grpo.engine)
    grpo.train()
    assert grpo.args.generation_batch_size == 8
    assert len(grpo.engine.calls) == 2  # 4 steps, a generation every 2
    assert [len(prompts) for prompts, _ in grpo.engine.calls] == [2, 2]  # 8 completions = 2 prompts × 4


def test_grpo_max_resample_rounds(tmp_path):
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    grpo = trainer_grpo.trainer(tmp_path, reward=constant, dynamic_sampling=True, max_resample_rounds=2)
    grpo.engine = RecordingEngine(grpo.engine)
    first_inputs(grpo)
    assert len(grpo.engine.calls) == 1 + 2  # no group ever differs: every refill round is used
    assert len(grpo._metrics["train"]["dynamic_sampling/resampled_prompts"]) == 2


def test_ppo_rollout_fields(tmp_path):
    ppo = trainer_ppo.trainer(
        tmp_path,
        stop_token_id=25,
        local_rollout_forward_batch_size=3,
        num_mini_batches=2,
        total_episodes=64,
        max_steps=-1,
    )
    assert ppo.eos_token_id == 25 and ppo.engine.eos_token_ids == [25]
    assert ppo.engine.batch_size == 3
    assert ppo.args.rollout_batch_size == 16 and ppo._micro_batches_per_rollout == 2 * 4  # mini-batches × epochs
    assert ppo.args.max_steps == 4 * 4 * 2  # 64 episodes = 4 rollouts of 16, × 4 epochs × 2 mini-batches
    batch = ppo.batch_type(*[torch.zeros(8, 2)] * 5)
    assert [len(part) for part in ppo._chunks(batch)] == [3, 3, 2]


def test_ppo_kl_penalty_estimator_reaches_the_loss(tmp_path, monkeypatch):
    import fastalign.trainers.kl_penalty as kl_penalty

    used = []
    real = kl_penalty.kl_estimate

    def record(a, b, estimator):
        used.append(estimator)
        return real(a, b, estimator)

    monkeypatch.setattr(kl_penalty, "kl_estimate", record)
    ppo = trainer_ppo.trainer(tmp_path, objective="kl_penalty", kl_penalty_estimator="k1", kl_coef=0.0)
    ppo.compute_loss(ppo.model, first_inputs(ppo))
    assert "k1" in used


def test_grpo_data_seed_orders_the_prompts(tmp_path):
    def order(**overrides):
        grpo = trainer_grpo.trainer(tmp_path, **overrides)
        return [row["number"] for row in next(iter(grpo.get_train_dataloader()))]

    assert order(seed=0) == order(seed=0, data_seed=0) and order(seed=0, data_seed=1) != order(seed=0)


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_tokenisation_fields_reach_the_dataset_and_the_tokenizer(tmp_path, kind, monkeypatch):
    """dataset_num_proc reaches the tokenisation, eos_token / pad_token the tokenizer."""
    module = {"sft": trainer_sft, "reward": trainer_reward, "dpo": trainer_dpo}[kind]
    trainer_module = sys.modules[f"fastalign.trainers.{kind}"]
    procs = []
    real = trainer_module.tokenize_dataset

    def record(*args, num_proc=None, **kwargs):
        procs.append(num_proc)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "tokenize_dataset", record)
    tokens = {"pad_token": "?"} | ({"eos_token": "."} if kind in ("sft", "reward") else {})
    trainer = module.trainer(tmp_path, dataset_num_proc=1, **tokens)
    assert procs == [1]
    for name, value in tokens.items():
        assert getattr(trainer.processing_class, name) == value, name


def test_sft_dataset_fields(tmp_path):
    rows = [{"content": row["prompt"] + row["completion"]} for row in addition_rows()]
    sft = trainer_sft.trainer(tmp_path, rows=rows, dataset_text_field="content", max_length=5, padding_free=True)
    lengths = [len(ids) for ids in sft.train_dataset["input_ids"]]
    assert lengths and max(lengths) == 5  # the "content" column was tokenised and cut at max_length
    assert sft.data_collator.padding_free


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_pad_to_multiple_of_reaches_the_collator(tmp_path, kind):
    module = trainer_reward if kind == "reward" else trainer_dpo
    trainer = module.trainer(tmp_path, pad_to_multiple_of=8)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 8 == 0


def test_dpo_fields_reach_the_loss_and_the_model(tmp_path):
    from fastalign.trainers.dpo import _dpo_loss_module

    dpo = trainer_dpo.trainer(tmp_path, loss_type="discopop", discopop_tau=0.2)
    module = _dpo_loss_module(dpo.args, dpo._adapter(dpo.model))
    assert module.options.discopop_tau == 0.2
    assert module.options == dpo.args.dpo_loss_options()
    with pytest.warns(UserWarning, match="padding_free is not available for DPO"):
        trainer_dpo.trainer(tmp_path, padding_free=True)


def test_dpo_model_init_kwargs_reach_from_pretrained(tmp_path):
    from helpers.tiny import tiny_causal_lm, word_tokenizer

    tiny_causal_lm().save_pretrained(tmp_path / "model")
    args = trainer_dpo.config(tmp_path, model_init_kwargs={"dtype": "float64"})
    dpo = DPOTrainer(
        str(tmp_path / "model"),
        args=args,
        processing_class=word_tokenizer(),
        train_dataset=datasets.Dataset.from_list(trainer_dpo.preference_rows()),
    )
    assert next(dpo.model.parameters()).dtype == torch.float64


def test_grpo_reward_weights(tmp_path):
    grpo = trainer_grpo.trainer(
        tmp_path,
        reward=[trainer_grpo.blue_reward, trainer_grpo.id_hash_reward],
        reward_weights=[0.0, 2.0],
        scale_rewards="none",
    )
    grpo.engine = RecordingEngine(grpo.engine)
    inputs = grpo._generate_and_score(next(iter(grpo.get_train_dataloader())), "train")
    batch = grpo.engine.batches[0]
    ids = [i[m.bool()].tolist() for i, m in zip(batch.completion_ids, batch.completion_mask, strict=True)]
    rewards = 2.0 * torch.tensor(trainer_grpo.id_hash_reward(None, ids))  # blue_reward weighs 0
    expected = rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(inputs.advantages.cpu(), expected)


class FakeVLLM(RecordingEngine):
    """Stands in for VLLMEngine (no vLLM here): records its construction, samples with HF generate."""

    built: ClassVar[list] = []

    def __init__(self, name, **kwargs):
        FakeVLLM.built.append((name, kwargs))
        super().__init__(None)

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)


@pytest.mark.parametrize("correction", [True, False])
def test_grpo_vllm_fields(tmp_path, monkeypatch, correction):
    import fastalign.rollout
    from fastalign.rollout import HFGenerateEngine

    FakeVLLM.built.clear()
    monkeypatch.setattr(fastalign.rollout, "VLLMEngine", FakeVLLM)
    options = {
        "use_vllm": True,
        "vllm_gpu_memory_utilization": 0.5,
        "vllm_tensor_parallel_size": 1,
        "vllm_importance_sampling_correction": correction,
        "vllm_importance_sampling_mode": "token_truncate",
        "vllm_importance_sampling_clip_max": 1.5,
    }
    grpo = trainer_grpo.trainer(tmp_path, **options)
    ((_, kwargs),) = FakeVLLM.built
    assert kwargs == {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 1}
    tokenizer = grpo.processing_class
    sampler = copy.deepcopy(grpo.model)  # the engine's own copy, as vLLM's
    grpo.engine.engine = HFGenerateEngine(sampler, pad_token_id=tokenizer.pad_token_id, eos_token_id=3)
    with torch.no_grad():  # the sampler's log-probs now differ from the trainer's
        grpo.model.lm_head.weight.add_(0.5 * torch.randn_like(grpo.model.lm_head.weight))
    inputs = first_inputs(grpo)
    assert (inputs.is_weights is not None) == correction
    if correction:
        weights = inputs.is_weights[inputs.completion_mask.bool()]
        assert weights.max() <= 1.5 and (weights == 1.5).any() and (weights < 1).any()  # truncated at the cap
        # The same rollout in TRL's default mode: one weight per sequence, exp of the summed log-ratio, zeroed
        # outside [clip_min, clip_max].
        grpo.args.vllm_importance_sampling_mode = "sequence_mask"
        grpo.args.vllm_importance_sampling_clip_min = 0.5
        inputs = first_inputs(grpo)
        sequence = inputs.is_weights
        assert sequence.shape == inputs.advantages.shape
        assert ((sequence == 0) | ((sequence >= 0.5) & (sequence <= 1.5))).all() and (sequence == 0).any()


def test_grpo_vllm_importance_sampling_checks(tmp_path):
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_cap is deprecated"):
        config = trainer_grpo.config(tmp_path, vllm_importance_sampling_cap=2.5)
    assert config.vllm_importance_sampling_clip_max == 2.5
    errors = [
        ({"vllm_importance_sampling_mode": "token"}, "vllm_importance_sampling_mode must be one of"),
        ({"vllm_importance_sampling_clip_min": 3.0}, "vllm_importance_sampling_clip_min (3.0) must be less than"),
        (
            {"vllm_importance_sampling_mode": "sequence_truncate", "vllm_importance_sampling_clip_max": None},
            "at least one of clip_min or clip_max must be set",
        ),
        (
            {"use_vllm": True, "loss_type": "vespo"},
            "vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask', got 'sequence_mask'",
        ),
    ]
    for change, message in errors:
        with pytest.raises(ValueError, match=re.escape(message)):
            trainer_grpo.config(tmp_path, **change)
    # Without the correction, its mode and bounds are not used and not checked.
    trainer_grpo.config(tmp_path, vllm_importance_sampling_correction=False, vllm_importance_sampling_mode="x")


def test_ppo_sampling_counts(tmp_path):
    ppo = trainer_ppo.trainer(tmp_path, num_generations=2)
    ppo.engine = RecordingEngine(ppo.engine)
    inputs = first_inputs(ppo)
    ((prompts, params),) = ppo.engine.calls
    assert params.num_generations == 2 and len(prompts) * 2 == ppo.args.rollout_batch_size
    assert inputs.completion_ids.shape[0] == ppo.args.per_device_train_batch_size


# ------------------------------------------------------------------------------------------------ inventory

REFUSE = "refused"  # at any value but the default: a row of REFUSED
HERE = "trainers/test_config_audit.py::"
GRPO_TESTS, PPO_TESTS = "trainers/test_trainer_grpo.py::", "trainers/test_trainer_ppo.py::"
NEWER_LOSSES = GRPO_TESTS + "test_one_step_of_the_newer_loss_types_equals_the_reference_on_eager_logps"
DPO_TESTS = "trainers/test_trainer_dpo.py::"
DISTILL_TESTS = "trainers/test_trainer_distill.py::"
DISTILL_SAMPLING = DISTILL_TESTS + "test_sampling_fields_reach_the_engine_and_length_limits_cut_the_dataset_rows"
SAMPLING_TEST = HERE + "test_sampling_fields_and_max_prompt_length_reach_the_engine"
TOKENS_TEST = HERE + "test_tokenisation_fields_reach_the_dataset_and_the_tokenizer"
# Each field a fastalign config declares (beyond TrainingArguments') -> the test that shows it honoured, or REFUSE.
AUDIT = {
    SFTConfig: {
        "backend": HERE + "test_backend_reaches_the_fused_ops",
        "dataset_text_field": HERE + "test_sft_dataset_fields",
        "max_length": HERE + "test_sft_dataset_fields",
        "packing": "trainers/test_trainer_sft.py::test_pretraining_on_packed_text",
        "padding_free": HERE + "test_sft_dataset_fields",
        "completion_only_loss": "trainers/test_trainer_sft.py::test_completion_only_loss_ignores_the_prompt",
        "eos_token": TOKENS_TEST,
        "pad_token": TOKENS_TEST,
        "dataset_num_proc": TOKENS_TEST,
    },
    RewardConfig: {
        "backend": REFUSE,
        "disable_dropout": "trainers/test_trainer_reward.py::test_dropout_is_disabled_unless_asked_to_keep_it",
        "dataset_num_proc": TOKENS_TEST,
        "eos_token": TOKENS_TEST,
        "pad_token": TOKENS_TEST,
        "max_length": "trainers/test_trainer_reward.py::test_pairs_longer_than_max_length_are_dropped",
        "pad_to_multiple_of": HERE + "test_pad_to_multiple_of_reaches_the_collator",
        "center_rewards_coefficient": "trainers/test_trainer_reward.py::test_one_step_equals_the_eager_step",
    },
    DPOConfig: {
        "backend": HERE + "test_backend_reaches_the_fused_ops",
        "model_init_kwargs": HERE + "test_dpo_model_init_kwargs_reach_from_pretrained",
        "router_aux_loss_coef": REFUSE,
        "ld_alpha": REFUSE,
        "f_divergence_type": REFUSE,
        "f_alpha_divergence_coef": REFUSE,
        "use_weighting": REFUSE,
        "activation_offloading": REFUSE,
        "sync_ref_model": REFUSE,
        "ref_model_mixup_alpha": REFUSE,
        "ref_model_sync_steps": REFUSE,
        "truncation_mode": REFUSE,
        "disable_dropout": HERE + "test_disable_dropout",
        "dataset_num_proc": TOKENS_TEST,
        "pad_token": TOKENS_TEST,
        "max_length": DPO_TESTS + "test_truncation_keeps_the_start_and_drops_prompts_that_fill_max_length",
        "padding_free": HERE + "test_dpo_fields_reach_the_loss_and_the_model",  # warns and pads, as TRL
        "pad_to_multiple_of": HERE + "test_pad_to_multiple_of_reaches_the_collator",
        "precompute_ref_log_probs": DPO_TESTS + "test_reference_modes_agree",
        "precompute_ref_batch_size": DPO_TESTS + "test_reference_modes_agree",
        "loss_type": DPO_TESTS + "test_every_loss_type_matches_dpo_loss_on_eager_logps",
        "loss_weights": DPO_TESTS + "test_one_step_equals_the_eager_trl_formula",
        "label_smoothing": DPO_TESTS + "test_every_loss_type_matches_dpo_loss_on_eager_logps",
        "beta": DPO_TESTS + "test_every_loss_type_matches_dpo_loss_on_eager_logps",
        "discopop_tau": HERE + "test_dpo_fields_reach_the_loss_and_the_model",
    },
    GRPOConfig: {
        "backend": HERE + "test_backend_reaches_the_fused_ops",
        "disable_dropout": HERE + "test_disable_dropout",
        "num_generations": GRPO_TESTS + "test_one_step_equals_the_eager_full_logits_loss",
        "max_completion_length": SAMPLING_TEST,
        "max_prompt_length": SAMPLING_TEST,
        "temperature": SAMPLING_TEST,
        "top_p": SAMPLING_TEST,
        "top_k": SAMPLING_TEST,
        "min_p": SAMPLING_TEST,
        "repetition_penalty": SAMPLING_TEST,
        "generation_batch_size": HERE + "test_grpo_generation_batch_feeds_steps_per_generation_micro_batches",
        "steps_per_generation": HERE + "test_grpo_generation_batch_feeds_steps_per_generation_micro_batches",
        "use_vllm": HERE + "test_grpo_vllm_fields",
        "vllm_gpu_memory_utilization": HERE + "test_grpo_vllm_fields",
        "vllm_tensor_parallel_size": HERE + "test_grpo_vllm_fields",
        "vllm_importance_sampling_correction": HERE + "test_grpo_vllm_fields",
        "vllm_importance_sampling_mode": HERE + "test_grpo_vllm_fields",
        "vllm_importance_sampling_clip_max": HERE + "test_grpo_vllm_fields",
        "vllm_importance_sampling_clip_min": HERE + "test_grpo_vllm_fields",
        "vllm_importance_sampling_cap": HERE + "test_grpo_vllm_importance_sampling_checks",
        "beta": GRPO_TESTS + "test_kl_to_a_reference_model",
        "num_iterations": GRPO_TESTS + "test_one_step_equals_the_eager_full_logits_loss",
        "epsilon": HERE + "test_grpo_loss_fields_reach_the_loss",
        "epsilon_high": GRPO_TESTS + "test_one_step_equals_the_eager_full_logits_loss",
        "importance_sampling_level": HERE + "test_grpo_loss_fields_reach_the_loss",
        "reward_weights": HERE + "test_grpo_reward_weights",
        "scale_rewards": HERE + "test_grpo_scale_rewards_and_mask_truncated_completions",
        "loss_type": HERE + "test_grpo_loss_fields_reach_the_loss",
        "delta": NEWER_LOSSES,
        "sapo_temperature_pos": NEWER_LOSSES,
        "sapo_temperature_neg": NEWER_LOSSES,
        "vespo_k_pos": HERE + "test_grpo_loss_fields_reach_the_loss",
        "vespo_lambda_pos": HERE + "test_grpo_loss_fields_reach_the_loss",
        "vespo_k_neg": NEWER_LOSSES,
        "vespo_lambda_neg": HERE + "test_grpo_loss_fields_reach_the_loss",
        "off_policy_mask_threshold": NEWER_LOSSES,
        "top_entropy_quantile": NEWER_LOSSES,
        "use_bias_correction_kl": NEWER_LOSSES,
        "mask_truncated_completions": HERE + "test_grpo_scale_rewards_and_mask_truncated_completions",
        "entropy_coef": HERE + "test_grpo_loss_fields_reach_the_loss",
        "dynamic_sampling": GRPO_TESTS + "test_dynamic_sampling_keeps_groups_whose_rewards_differ",
        "max_resample_rounds": HERE + "test_grpo_max_resample_rounds",
        "log_completions": GRPO_TESTS + "test_log_completions_prints_prompts_completions_rewards_and_advantages",
        "num_completions_to_print": GRPO_TESTS
        + "test_log_completions_prints_prompts_completions_rewards_and_advantages",
    },
    PPOConfig: {
        "backend": HERE + "test_backend_reaches_the_fused_ops",
        "disable_dropout": HERE + "test_disable_dropout",
        "dataset_num_proc": REFUSE,
        "reward_model_path": "cli/test_cli.py::test_ppo_from_yaml_with_a_reward_model_and_a_rule",
        "total_episodes": HERE + "test_ppo_rollout_fields",
        "response_length": SAMPLING_TEST,
        "max_prompt_length": SAMPLING_TEST,
        "num_generations": HERE + "test_ppo_sampling_counts",
        "temperature": SAMPLING_TEST,
        "top_p": SAMPLING_TEST,
        "top_k": SAMPLING_TEST,
        "stop_token": REFUSE,  # None and "eos" mean the same: completions end at EOS (stop_token_id)
        "stop_token_id": HERE + "test_ppo_rollout_fields",
        "local_rollout_forward_batch_size": HERE + "test_ppo_rollout_fields",
        "missing_eos_penalty": PPO_TESTS + "test_rewards_carry_the_kl_per_token_and_the_score_at_the_last_token",
        "reward_weights": HERE + "test_grpo_reward_weights",  # the same score_rollout
        "num_ppo_epochs": PPO_TESTS + "test_mean_score_rises_on_a_toy_rule_reward",
        "num_mini_batches": HERE + "test_ppo_rollout_fields",
        "objective": PPO_TESTS + "test_one_update_equals_the_eager_full_logits_losses",
        "cliprange": PPO_TESTS + "test_one_update_equals_the_eager_full_logits_losses",
        "vf_coef": PPO_TESTS + "test_one_update_equals_the_eager_full_logits_losses",
        "cliprange_value": PPO_TESTS + "test_one_update_equals_the_eager_full_logits_losses",
        "gamma": PPO_TESTS + "test_gae_advantages_and_returns_match_a_reference_loop",
        "lam": PPO_TESTS + "test_gae_advantages_and_returns_match_a_reference_loop",
        "whiten_rewards": PPO_TESTS + "test_gae_advantages_and_returns_match_a_reference_loop",
        "whiten_advantages": PPO_TESTS + "test_advantages_are_whitened_by_default",
        "kl_coef": PPO_TESTS + "test_rewards_carry_the_kl_per_token_and_the_score_at_the_last_token",
        "kl_estimator": PPO_TESTS + "test_rewards_carry_the_kl_per_token_and_the_score_at_the_last_token",
        "kl_in_reward": PPO_TESTS + "test_kl_in_the_loss_and_saving",
        "kl_penalty_coef": PPO_TESTS + "test_one_update_equals_the_eager_full_logits_losses",
        "kl_penalty_estimator": HERE + "test_ppo_kl_penalty_estimator_reaches_the_loss",
        "target_kl": PPO_TESTS + "test_the_trainer_adapts_beta_from_the_measured_kl_after_each_update",
    },
    DistillConfig: {
        "backend": DISTILL_TESTS + "test_backend_reaches_the_fused_divergence",
        "disable_dropout": DISTILL_TESTS + "test_disable_dropout_is_the_students_and_the_teacher_never_drops",
        "teacher_model_name_or_path": DISTILL_TESTS
        + "test_the_teacher_loads_from_its_folder_with_its_tokenizer_checked",
        "teacher_model_revision": DISTILL_TESTS + "test_the_teacher_loads_from_its_folder_with_its_tokenizer_checked",
        "lmbda": DISTILL_TESTS + "test_lmbda_draws_are_seeded_by_the_step_and_off_policy_batches_are_the_datasets",
        "beta": DISTILL_TESTS + "test_one_step_equals_the_float64_divergence_of_the_full_logits",
        "temperature": DISTILL_TESTS + "test_one_step_equals_the_float64_divergence_of_the_full_logits",
        "max_completion_length": DISTILL_SAMPLING,
        "max_prompt_length": DISTILL_SAMPLING,
        "top_p": DISTILL_SAMPLING,
        "top_k": DISTILL_SAMPLING,
        "min_p": DISTILL_SAMPLING,
        "repetition_penalty": DISTILL_SAMPLING,
        "log_completions": DISTILL_TESTS + "test_log_completions_prints_prompts_completions_and_their_source",
        "num_completions_to_print": DISTILL_TESTS + "test_log_completions_prints_prompts_completions_and_their_source",
    },
}


def _test_names() -> set[str]:
    names = set()
    tests = Path(__file__).resolve().parents[1]
    for path in tests.rglob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                names.add(f"{path.relative_to(tests).as_posix()}::{node.name}")
    return names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_declared_field_is_audited(config):
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    declared = {f.name for f in dataclasses.fields(config)} - inherited
    assert set(AUDIT[config]) == declared, "fields to audit (honoured by which test, or refused)"
    tests, refused = _test_names(), {(c, name) for c, name, _, _ in REFUSED}
    for name, where in AUDIT[config].items():
        if where == REFUSE:
            assert (config, name) in refused, f"{config.__name__}.{name}: no refusal test"
        else:
            assert where in tests, f"{config.__name__}.{name}: {where} does not exist"
    for name in config._UNHONOURED_FIELDS:  # every refusal listed in a config is tested
        assert (config, name) in refused or name == "dataloader_prefetch_factor", name


def test_sft_neftune_noise_reaches_the_fused_loss(tmp_path):
    """Trainer's NEFTune hook is on the input embeddings, which the fused loss runs through: same weights,
    different loss."""

    def first_loss(**overrides):
        sft = trainer_sft.trainer(tmp_path, max_steps=1, learning_rate=0.0, **overrides)
        sft.train()
        return sft.state.log_history[0]["loss"]

    assert first_loss() == first_loss()  # deterministic without noise
    assert abs(first_loss(neftune_noise_alpha=50.0) - first_loss()) > 1e-3
