"""Resuming and stopping: ``num_tokens`` goes on from the checkpoint, a checkpoint without its optimizer state
or with a truncated weights file is refused with the file named, the online trainers' rollout engines sample
from the checkpoint's weights after a resume, and a non-finite loss stops training with the step and the
non-finite input named."""

import math

import datasets
import pytest
import torch
from helpers import trainer_dpo, trainer_grpo, trainer_reward, trainer_sft
from helpers.engines import OwnCopyEngine
from helpers.tiny import tiny_causal_lm, word_tokenizer

from fastalign.trainers import GRPOTrainer

BUILDERS = {"sft": trainer_sft.trainer, "dpo": trainer_dpo.trainer, "reward": trainer_reward.trainer}


def tokens_logged(trainer) -> list[float]:
    return [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]


def checkpointed(make, tmp_path, **overrides):
    """A run of 4 steps that saves at step 2; returns it and the checkpoint-2 folder."""
    run = make(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2, **overrides)
    run.train()
    return run, tmp_path / "b" / "out" / "checkpoint-2"


@pytest.mark.parametrize("kind", BUILDERS)
def test_num_tokens_continues_from_the_checkpoint(tmp_path, kind):
    make = BUILDERS[kind]
    straight, checkpoint = checkpointed(make, tmp_path, logging_steps=3)  # step 2 is not a logging step
    resumed = make(tmp_path / "c", max_steps=4, logging_steps=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = tokens_logged(straight), tokens_logged(resumed)
    assert got and expected[-1] == got[-1], (expected, got)
    assert got[0] > 0.5 * expected[-1]  # steps 1-2 are counted: half the tokens, give or take the padding


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_checkpoint_without_its_optimizer_state_is_refused(tmp_path, kind):
    _, checkpoint = checkpointed(BUILDERS[kind], tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    resumed = BUILDERS[kind](tmp_path / "c", max_steps=4)
    with pytest.raises(ValueError, match=r"checkpoint-2 has no optimizer state \(optimizer\.pt\)"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_a_truncated_weights_file_is_named(tmp_path):
    _, checkpoint = checkpointed(trainer_sft.trainer, tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    resumed = trainer_sft.trainer(tmp_path / "c", max_steps=4)
    with pytest.raises(ValueError, match=rf"{weights}: cannot be read .*truncated or corrupt"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_grpo_samples_from_the_checkpoints_weights_after_a_resume(tmp_path):
    def make(folder, engine_model=None, **overrides):
        model, tokenizer = tiny_causal_lm(), word_tokenizer()
        engine = OwnCopyEngine(model, tokenizer)
        grpo = GRPOTrainer(
            model,
            reward_funcs=trainer_grpo.id_hash_reward,
            args=trainer_grpo.config(folder, **overrides),
            train_dataset=datasets.Dataset.from_list(trainer_grpo.PROMPTS),
            processing_class=tokenizer,
            rollout_engine=engine,
        )
        return grpo, engine

    first, _ = make(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    saved = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    resumed, engine = make(tmp_path / "c", max_steps=3)  # its engine holds the initial weights
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    assert len(engine.sampled_with) == 1
    for name, value in engine.sampled_with[0].items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


def nan_at_call(function, call):
    """``function``, whose ``call``-th result (a tensor, or the tensors of a tuple) is NaN: a stand-in for a
    non-finite value reaching the loss (reward functions may not return inf, and NaN means "unscorable")."""
    calls = []

    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        calls.append(1)
        if len(calls) != call:
            return out
        return tuple(t.clone().fill_(math.nan) for t in out) if isinstance(out, tuple) else out.clone().fill_(math.nan)

    return wrapped


def test_grpo_stops_at_non_finite_advantages_naming_the_step_and_them(tmp_path, monkeypatch):
    import fastalign.trainers.grpo as grpo_module

    monkeypatch.setattr(grpo_module, "_advantages_of", nan_at_call(grpo_module._advantages_of, 2))
    grpo = trainer_grpo.trainer(tmp_path, max_steps=4, logging_steps=3)
    with pytest.raises(FloatingPointError, match=r"step 2: the training loss is not finite.*advantages"):
        grpo.train()
    assert grpo.state.global_step == 2  # stopped before the next generation, which NaN weights would break


def test_ppo_stops_at_non_finite_scores_naming_them(tmp_path, monkeypatch):
    from helpers import trainer_ppo

    ppo = trainer_ppo.trainer(tmp_path, max_steps=8)
    monkeypatch.setattr(ppo, "_score", nan_at_call(ppo._score, 2))
    with pytest.raises(
        FloatingPointError, match=r"step 5: the training loss is not finite.*scores \(from the rewards\)"
    ):
        ppo.train()  # the second rollout (steps 5-8)


def test_sft_stops_at_a_nan_loss_naming_the_step_and_the_forward(tmp_path):
    sft = trainer_sft.trainer(tmp_path, max_steps=4, logging_steps=2)
    model = sft.model
    calls = []

    def poison(module, args, output):  # the 3rd forward's hidden states are NaN
        calls.append(1)
        return output.masked_fill(torch.ones_like(output, dtype=torch.bool), math.nan) if len(calls) == 3 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"step 3: the training loss is not finite.*model's forward"):
        sft.train()
