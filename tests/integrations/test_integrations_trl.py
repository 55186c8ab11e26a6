"""fastalign.integrations.trl: TRL 1.16's trainers built with fastalign's fused head compute TRL's own loss,
gradients and metrics, without TRL's kernel and without the lm_head module (the full logits).

Every comparison builds TRL's trainer and the fused subclass from identical seeds, configs (float32: bf16 off)
and data, runs one loss + backward with each, and compares the loss, every parameter's gradient and the logged
metrics. Spies check which kernel ran: TRL's ``ChunkedLogProbFunction`` in TRL's step and never in the fused
one, fastalign's torch kernel in the fused step and never in TRL's.
"""

import subprocess
import sys
import textwrap

import datasets
import pytest
import torch
import trl
from helpers.tiny import NUMBERS, addition_rows, tiny_causal_lm, word_tokenizer
from transformers import MixtralConfig, MixtralForCausalLM
from trl.trainer import utils as trl_utils

from fastalign.integrations.trl import FusedDPOTrainer, FusedGRPOTrainer, FusedSFTTrainer, add_fastalign_lm_head
from fastalign.models import unwrap_peft
from fastalign.ops import _torch_backend

# Float32 end to end: tight tolerances (one rounding order against another, summed over a dozen tokens).
TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}


def common_args(tmp_path) -> dict:
    return {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False, "seed": 0}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of TRL's chunked log-prob kernel and of fastalign's torch-backend forward."""
    calls = {"trl": 0, "fastalign": 0}
    trl_kernel = trl_utils._ChunkedLogProbFunction
    fastalign_forward = _torch_backend.linear_forward

    class CountingKernel:
        @staticmethod
        def apply(*args):
            calls["trl"] += 1
            return trl_kernel.apply(*args)

    def counting_forward(*args):
        calls["fastalign"] += 1
        return fastalign_forward(*args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingKernel)
    monkeypatch.setattr(_torch_backend, "linear_forward", counting_forward)
    return calls


def one_step(trainer, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, list], int]:
    """Loss, gradients and logged metrics of one ``compute_loss`` + backward, and the lm_head module's calls."""
    model = trainer.model
    lm_head = unwrap_peft(model).get_output_embeddings()
    head_calls = []
    hook = lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    model.zero_grad(set_to_none=True)
    for metrics in trainer._metrics.values():
        metrics.clear()
    try:
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
    finally:
        hook.remove()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}, len(head_calls)


def assert_same_step(reference, fused, reference_inputs, fused_inputs, kernel_calls, unstable=()) -> dict[str, list]:
    """TRL's step on TRL's trainer and the fused step agree; each ran its own kernel; no full logits.

    ``unstable``: metrics that threshold values which are rounding noise in the test's setting (compared by name).
    """
    kernel_calls.update(trl=0, fastalign=0)
    expected_loss, expected_grads, expected_metrics, _ = one_step(reference, reference_inputs)
    assert kernel_calls["trl"] > 0 and kernel_calls["fastalign"] == 0
    kernel_calls.update(trl=0, fastalign=0)
    loss, grads, metrics, head_calls = one_step(fused, fused_inputs)
    assert kernel_calls["trl"] == 0 and kernel_calls["fastalign"] > 0
    assert head_calls == 0  # the [tokens, vocab] logits were never formed by the lm_head module
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCE, msg=name)
    assert metrics.keys() == expected_metrics.keys()
    for name, values in metrics.items():
        if name in unstable:
            continue
        assert values == pytest.approx(expected_metrics[name], rel=1e-4, abs=1e-5), name
    return metrics


# ----------------------------------------------------------------------------------------------------- the head


@pytest.mark.parametrize("layout", ["llama", "qwen2"])
def test_head_matches_eager_full_logits(layout):
    """Log-probs, entropy, mean logits and top-1 flags (and the gradient) against the model's own logits, in
    float64: in float32 the gradients of the two paths differ by rounding that depends on the CPU's vector width
    (seen: a third of a 1e-4 tolerance with AVX2, a seventh without vector code)."""
    model = tiny_causal_lm(layout, seed=3).double()
    temperature = 0.7
    add_fastalign_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 30, (3, 9), generator=generator)
    with torch.no_grad():  # make a few labels the argmax token, so that is_top1 has both values
        argmax = model(input_ids=input_ids).logits.argmax(-1)
    input_ids[:, 5:] = argmax[:, 4:-1]
    labels = input_ids.clone()
    labels[:, :3] = -100

    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=input_ids).logits[:, :-1].double() / temperature  # the unpatched forward
    targets, valid = labels[:, 1:], labels[:, 1:] != -100
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    (logp.sum() + entropy.sum()).backward()
    # float64 rounding through two layers is near 1e-15; 1e-10 is far above it and far below any float32 step.
    exact = {"rtol": 1e-10, "atol": 1e-10}
    assert out.log_probs.dtype == torch.float64
    torch.testing.assert_close(out.log_probs, logp.detach(), **exact)
    torch.testing.assert_close(out.entropy, entropy.detach(), **exact)
    torch.testing.assert_close(out.mean_logits, logits.detach().mean(-1) * valid, **exact)
    is_top1 = (logits.argmax(-1) == targets) & valid
    assert is_top1.any() and not is_top1[valid].all()
    assert torch.equal(out.is_top1, is_top1)
    assert torch.equal(out.label_mask, valid)
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / valid.sum())
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, **exact, msg=name)


def test_head_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        add_fastalign_lm_head(tiny_causal_lm(), outputs=("log_probs", "log_sum_sq_probs"))
    model = tiny_causal_lm()
    model.config.output_multiplier = 2.0  # Muse Glimmer's pre-softcap logit multiplier
    with pytest.raises(ValueError, match="output_multiplier"):
        add_fastalign_lm_head(model)


# ------------------------------------------------------------------------------------------------------- SFT


def sft_trainers(tmp_path, layout="llama", **config):
    rows = datasets.Dataset.from_list(addition_rows())
    built = []
    for cls in (trl.SFTTrainer, FusedSFTTrainer):
        args = trl.SFTConfig(**common_args(tmp_path / cls.__name__), per_device_train_batch_size=4, **config)
        model = tiny_causal_lm(layout)
        built.append(cls(model=model, args=args, train_dataset=rows, processing_class=word_tokenizer()))
    return built


@pytest.mark.parametrize(
    ("layout", "config"),
    [
        ("llama", {}),
        ("llama", {"loss_type": "dft"}),
        ("llama", {"completion_only_loss": False}),
        ("llama", {"padding_free": True, "max_length": None}),
        ("qwen2", {}),  # tied embeddings: the lm_head weight is the input embedding
    ],
)
def test_sft_step_equals_trl(tmp_path, kernel_calls, layout, config):
    reference, fused = sft_trainers(tmp_path, layout, **config)
    inputs = reference._prepare_inputs(next(iter(reference.get_train_dataloader())))
    metrics = assert_same_step(reference, fused, inputs, inputs, kernel_calls)
    assert {"entropy", "mean_token_accuracy", "num_tokens"} <= metrics.keys()


def test_sft_refuses_full_logit_options(tmp_path):
    rows = datasets.Dataset.from_list(addition_rows())
    args = trl.SFTConfig(**common_args(tmp_path), label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1"):
        FusedSFTTrainer(model=tiny_causal_lm(), args=args, train_dataset=rows, processing_class=word_tokenizer())
    args = trl.SFTConfig(**common_args(tmp_path))
    for keyword in ("compute_loss_func", "compute_metrics", "preprocess_logits_for_metrics"):
        with pytest.raises(ValueError, match=keyword):
            FusedSFTTrainer(
                model=tiny_causal_lm(), args=args, train_dataset=rows, processing_class=word_tokenizer(),
                **{keyword: lambda *a, **k: 0.0},
            )  # fmt: skip


def test_moe_auxiliary_loss_is_refused(tmp_path):
    config = MixtralConfig(
        vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, pad_token_id=0,
    )  # fmt: skip
    rows = datasets.Dataset.from_list(addition_rows())
    args = trl.SFTConfig(**common_args(tmp_path), router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=0\.01"):
        FusedSFTTrainer(
            model=MixtralForCausalLM(config), args=args, train_dataset=rows, processing_class=word_tokenizer()
        )


# ------------------------------------------------------------------------------------------------------- DPO


def preference_rows() -> list[dict[str, str]]:
    return [
        {
            "prompt": f"add one to {NUMBERS[n]} . the answer is",
            "chosen": f" {NUMBERS[n + 1]} .",
            "rejected": " ".join(NUMBERS[(n + k) % 10] for k in range(1 + n % 3)) + " .",
        }
        for n in range(8)
    ]


def dpo_trainers(tmp_path, with_ref_model=True, **config):
    rows = datasets.Dataset.from_list(preference_rows())
    built = []
    for cls in (trl.DPOTrainer, FusedDPOTrainer):
        args = trl.DPOConfig(**common_args(tmp_path / cls.__name__), per_device_train_batch_size=4, **config)
        ref_model = tiny_causal_lm(seed=1) if with_ref_model else None
        built.append(
            cls(model=tiny_causal_lm(), ref_model=ref_model, args=args, train_dataset=rows,
                processing_class=word_tokenizer())
        )  # fmt: skip
    return built


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"loss_type": ["ipo"], "beta": 0.5},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"loss_type": ["robust", "hinge"], "label_smoothing": 0.1},
        {"loss_type": ["aot"], "label_smoothing": 0.1},
        {"loss_type": ["apo_zero", "sigmoid_norm", "discopop"]},
        {"ld_alpha": 0.5, "f_divergence_type": "js_divergence"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
        {"precompute_ref_log_probs": True},
    ],
)
def test_dpo_step_equals_trl(tmp_path, kernel_calls, config):
    kernel_calls.update(trl=0, fastalign=0)
    reference, fused = dpo_trainers(tmp_path, **config)
    if config.get("precompute_ref_log_probs"):
        # Each trainer precomputed its reference column at construction, each with its own kernel.
        assert kernel_calls["trl"] > 0 and kernel_calls["fastalign"] > 0
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(
                torch.tensor(fused.train_dataset[column]), torch.tensor(reference.train_dataset[column]), **TOLERANCE
            )
    reference_inputs = reference._prepare_inputs(next(iter(reference.get_train_dataloader())))
    fused_inputs = fused._prepare_inputs(next(iter(fused.get_train_dataloader())))
    metrics = assert_same_step(reference, fused, reference_inputs, fused_inputs, kernel_calls)
    expected = {
        "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen", "rewards/rejected",
        "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
    }  # fmt: skip
    assert expected <= metrics.keys()


def test_dpo_precompute_without_ref_model_uses_fastalign(tmp_path, kernel_calls):
    """No ref_model: the policy at construction is the reference, precomputed with fastalign's kernel."""
    reference, fused = dpo_trainers(tmp_path, with_ref_model=False, precompute_ref_log_probs=True)
    assert fused.ref_model is None
    torch.testing.assert_close(
        torch.tensor(fused.train_dataset["ref_chosen_logps"]),
        torch.tensor(reference.train_dataset["ref_chosen_logps"]),
        **TOLERANCE,
    )
    inputs = reference._prepare_inputs(next(iter(reference.get_train_dataloader())))
    # Policy and reference are one model here: every reward is 0 up to rounding, so chosen > rejected is a coin flip.
    assert_same_step(reference, fused, inputs, inputs, kernel_calls, unstable=("rewards/accuracies",))


def test_dpo_refuses_weighting_and_metrics(tmp_path):
    rows = datasets.Dataset.from_list(preference_rows())
    args = trl.DPOConfig(**common_args(tmp_path), use_weighting=True)
    with pytest.raises(ValueError, match="use_weighting=True"):
        FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(seed=1), args=args, train_dataset=rows,
                        processing_class=word_tokenizer())  # fmt: skip
    args = trl.DPOConfig(**common_args(tmp_path))
    with pytest.raises(ValueError, match="compute_metrics"):
        FusedDPOTrainer(model=tiny_causal_lm(), ref_model=tiny_causal_lm(seed=1), args=args, train_dataset=rows,
                        processing_class=word_tokenizer(), compute_metrics=lambda prediction: {})  # fmt: skip


# ------------------------------------------------------------------------------------------------------ GRPO


def varied_reward(completions, **kwargs):
    """Differs within a group, so that the advantages are not all zero."""
    return [float(len(completion) % 7) for completion in completions]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """GRPO with beta > 0 loads its reference from the policy's path: the tiny model, saved."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm().save_pretrained(path)
    return str(path)


def grpo_inputs(trainer, old_logp_noise: torch.Tensor) -> dict:
    """One micro-batch of a fresh generation batch, sampled under a fixed seed; the old policy's log-probs are
    moved off the current ones, so that the ratios leave 1 and the clipping branches are exercised."""
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(1)
    inputs = trainer._prepare_inputs(batch)
    inputs = dict(inputs)
    old = inputs["old_per_token_logps"]
    inputs["old_per_token_logps_original"] = old
    inputs["old_per_token_logps"] = old + old_logp_noise[:, : old.shape[1]] * inputs["completion_mask"]
    return inputs


@pytest.mark.parametrize(
    "config",
    [
        {"loss_type": "grpo", "beta": 0.1},
        {"loss_type": "dapo", "epsilon_high": 0.28},
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "beta": 0.05},
        # Not the median: the four completions' first tokens tie there (one prompt), and rounding picks the side.
        {"loss_type": "bnpo", "delta": 1.5, "top_entropy_quantile": 0.25, "entropy_coef": 0.05},
        {"loss_type": "cispo", "epsilon_high": 1.1},
        {"loss_type": "sapo", "use_bias_correction_kl": True, "beta": 0.1},
        {"loss_type": "luspo", "importance_sampling_level": "sequence", "cast_lm_head_to_fp32": True},
    ],
)
def test_grpo_step_equals_trl(tmp_path, kernel_calls, saved_model, config):
    dataset = datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in addition_rows()])
    built = []
    for cls in (trl.GRPOTrainer, FusedGRPOTrainer):
        args = trl.GRPOConfig(
            **common_args(tmp_path / cls.__name__), per_device_train_batch_size=4, num_generations=4,
            max_completion_length=6, num_iterations=2, temperature=0.7, **config,
        )  # fmt: skip
        trainer = cls(model=saved_model, reward_funcs=varied_reward, args=args, train_dataset=dataset,
                      processing_class=word_tokenizer())  # fmt: skip
        # What the training loop (which this test skips) sets: train mode, the accumulation steps of this step.
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        built.append(trainer)
    reference, fused = built
    noise = 0.3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    kernel_calls.update(trl=0, fastalign=0)
    reference_inputs = grpo_inputs(reference, noise)
    assert kernel_calls["trl"] > 0 and kernel_calls["fastalign"] == 0
    kernel_calls.update(trl=0, fastalign=0)
    fused_inputs = grpo_inputs(fused, noise)
    assert kernel_calls["trl"] == 0 and kernel_calls["fastalign"] > 0
    # Same samples; the old policy's (and reference's) log-probs come from each trainer's own head.
    assert torch.equal(fused_inputs["completion_ids"], reference_inputs["completion_ids"])
    assert fused_inputs["completion_mask"].sum() > 0
    torch.testing.assert_close(fused_inputs["advantages"], reference_inputs["advantages"])
    assert reference_inputs["advantages"].abs().sum() > 0
    for key in ("old_per_token_logps_original", "ref_per_token_logps"):
        if key in reference_inputs:
            torch.testing.assert_close(fused_inputs[key], reference_inputs[key], **TOLERANCE)
    assert ("ref_per_token_logps" in fused_inputs) == (config.get("beta", 0.0) != 0.0)
    for inputs in (reference_inputs, fused_inputs):
        del inputs["old_per_token_logps_original"]
    metrics = assert_same_step(reference, fused, reference_inputs, fused_inputs, kernel_calls)
    assert "entropy" in metrics


# ---------------------------------------------------------------------------------------------------- import


def run_python(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True, text=True, timeout=120)


def test_trl_stays_optional():
    result = run_python("""
        import sys
        import fastalign, fastalign.integrations
        assert "trl" not in sys.modules, "importing fastalign imported trl"
        sys.modules["trl"] = None  # as if TRL were not installed
        try:
            import fastalign.integrations.trl
        except ImportError as error:
            assert "pip install trl" in str(error), error
        else:
            raise AssertionError("no ImportError without trl")
    """)
    assert result.returncode == 0, result.stderr


def test_head_refuses_a_sharded_lm_head_weight():
    """A DTensor lm_head weight in the forward (tensor parallelism) is refused by name, not a mixed-tensor error."""
    result = run_python("""
        import sys
        sys.path.insert(0, "tests")
        import pytest, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from helpers.tiny import tiny_causal_lm
        from fastalign.integrations.trl import add_fastalign_lm_head

        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        model = tiny_causal_lm()
        add_fastalign_lm_head(model)
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        input_ids = torch.randint(4, 30, (2, 6))
        with pytest.raises(ValueError, match="sharded DTensor"):
            model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
        dist.destroy_process_group()
    """)
    assert result.returncode == 0, result.stderr
