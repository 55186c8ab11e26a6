"""policy_loss inputs and runners: the option cases, float64 inputs with an empty row, loss and gradients of a
backend, and the comparisons the CUDA tests (CPU and GPU) make."""

import torch

CASES = [
    {},
    {"clip_eps_high": 0.28, "loss_type": "dapo"},
    {"loss_type": "grpo", "per_token_advantages": True},
    {"loss_type": "dr_grpo", "max_completion_length": 12},
    {"loss_agg_mode": "seq-mean-token-sum", "dual_clip": 3.0, "per_token_advantages": True},
    {"kl_coef": 0.05, "kl_estimator": "k1", "with_ref": True},
    {"kl_coef": 0.1, "kl_estimator": "k2", "with_ref": True, "loss_agg_mode": "seq-mean-token-mean"},
    {"kl_coef": 0.04, "kl_estimator": "low_var_kl", "with_ref": True, "entropy_coef": 0.01, "with_entropy": True},
    {"importance_sampling_level": "sequence", "loss_type": "grpo"},
    {"importance_sampling_level": "sequence", "dual_clip": 2.5, "kl_coef": 0.02, "with_ref": True},
    {"with_is_weights": True, "num_items_in_batch": 40},
    {"with_is_weights": "per_row", "dual_clip": 3.0, "entropy_coef": 0.02, "with_entropy": True},
    # TRL's newer loss types and INTELLECT-2's two-sided clip (delta below 1 + clip_eps_high, so that it binds).
    {"loss_type": "cispo", "clip_eps_high": 1.2},
    {"loss_type": "cispo", "clip_eps_high": 5.0, "kl_coef": 0.05, "with_ref": True, "with_is_weights": True},
    {"loss_type": "sapo", "per_token_advantages": True},
    {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0, "entropy_coef": 0.01,
     "with_entropy": True},
    {"loss_type": "vespo"},
    {"loss_type": "vespo", "with_is_weights": True, "per_token_advantages": True, "vespo_k_neg": 1.5,
     "kl_coef": 0.05, "with_ref": True},
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "dapo", "delta": 1.1, "per_token_advantages": True},
    {"delta": 1.5, "dual_clip": 3.0, "importance_sampling_level": "sequence", "per_token_advantages": True},
    # DeepSeek-V3.2's off-policy sequence mask (against the sampler's log-probs, or the old ones) and the
    # top-entropy token mask; thresholds where some rows / tokens are dropped and some kept.
    {"off_policy_mask_threshold": 0.0, "with_sampler": True, "with_is_weights": True},
    {"off_policy_mask_threshold": -0.2, "per_token_advantages": True, "kl_coef": 0.05, "with_ref": True},
    {"off_policy_mask_threshold": 0.0, "with_sampler": True, "importance_sampling_level": "sequence"},
    {"top_entropy_quantile": 0.3, "with_entropy": True},
    # DeepSeek-V3.2's bias-corrected KL, at token and sequence level, with each estimator.
    {"use_bias_correction_kl": True, "kl_coef": 0.3, "with_ref": True, "kl_estimator": "k3"},
    {"use_bias_correction_kl": True, "kl_coef": 0.3, "with_ref": True, "kl_estimator": "k1", "loss_type": "cispo",
     "clip_eps_high": 2.0, "per_token_advantages": True},
    {"use_bias_correction_kl": True, "kl_coef": 0.3, "with_ref": True, "kl_estimator": "k2",
     "importance_sampling_level": "sequence", "with_is_weights": True},
    {"top_entropy_quantile": 0.0, "with_entropy": True, "loss_type": "vespo", "with_is_weights": True,
     "off_policy_mask_threshold": 0.1, "with_sampler": True},
]  # fmt: skip


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items()) or "plain"


def make_inputs(case, rows=5, width=9, seed=0, spread=0.4):
    """float64 inputs; log-ratios spread wide enough that every clip binds somewhere; row 2 is empty."""
    gen = torch.Generator().manual_seed(seed)
    case = dict(case)
    logps = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 3
    advantages_shape = (rows, width) if case.pop("per_token_advantages", False) else (rows,)
    inputs = {
        "logps": logps,
        "old_logps": logps + spread * torch.randn(rows, width, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(advantages_shape, generator=gen, dtype=torch.float64),
        "mask": (torch.rand(rows, width, generator=gen) > 0.25).to(torch.float64),
    }
    inputs["mask"][2] = 0
    if case.pop("with_ref", False):
        inputs["ref_logps"] = logps + 0.3 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    if case.pop("with_entropy", False):
        inputs["entropy"] = torch.rand(rows, width, generator=gen, dtype=torch.float64) * 2
    if case.pop("with_sampler", False):
        inputs["sampler_logps"] = inputs["old_logps"] + spread * torch.randn(
            rows, width, generator=gen, dtype=torch.float64
        )
    weights = case.pop("with_is_weights", False)
    if weights:
        shape = (rows,) if weights == "per_row" else (rows, width)
        inputs["is_weights"] = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(0.2)
    return inputs, case


def run(fn, inputs, options, dtype):
    """Loss and gradients w.r.t. logps (and entropy) for inputs converted to dtype."""
    tensors = {k: v.to(dtype) for k, v in inputs.items()}
    leaves = [tensors["logps"].requires_grad_()]
    if "entropy" in tensors:
        leaves.append(tensors["entropy"].requires_grad_())
    out = fn(**tensors, **options)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
    else:  # the reference builds no graph when every token is masked
        grads = [torch.zeros_like(x) for x in leaves]
    return loss.detach(), [g.detach() for g in grads], out[1] if isinstance(out, tuple) else None


def loss_and_grads(fn, tensors, options):
    """(loss, [d logps, d entropy], metrics) of fn on tensors (logps and entropy become leaves)."""
    tensors = dict(tensors)
    leaves = []
    for name in ("logps", "entropy"):
        if name in tensors:
            tensors[name] = tensors[name].detach().requires_grad_()
            leaves.append(tensors[name])
    loss, metrics = fn(**tensors, **options)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
    return loss.detach(), grads, metrics


def assert_close_to(got, want, rtol):
    """Loss and gradients to rtol (gradients also to rtol × their largest magnitude), metrics to float32's."""
    (loss, grads, metrics), (want_loss, want_grads, want_metrics) = got, want
    torch.testing.assert_close(loss.double(), want_loss.double(), rtol=rtol, atol=1e-6)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        scale = float(want_grad.abs().max()) if want_grad.numel() else 0.0
        torch.testing.assert_close(grad.double(), want_grad.double(), rtol=rtol, atol=rtol * scale + 1e-12)
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name].double(), value.double(), rtol=1e-5, atol=1e-6, msg=name)


def gpu_inputs(case, rows=5, width=300, seed=0):
    """make_inputs (row 2 empty) with log-ratios beyond the clamp: ±25 and ±30 on four tokens of row 0, +30 on
    all of row 3 (whose sequence-level ratio is clamped too). Their advantages are made positive, so that the
    loss takes the clipped value rather than A · e^20 (which would drown the other tokens). Any shape: larger
    inputs cut down."""
    inputs, options = make_inputs(case, rows=max(rows, 4), width=max(width, 4), seed=seed, spread=1.0)
    inputs["old_logps"][0, :4] -= torch.tensor([25.0, 30.0, -25.0, -30.0], dtype=torch.float64)
    inputs["old_logps"][3] -= 30.0
    advantages = inputs["advantages"]
    for index in ((0, slice(0, 4)), 3) if advantages.dim() == 2 else (0, 3):
        advantages[index] = advantages[index].abs()
    return {k: v[:rows, :width] if v.dim() == 2 else v[:rows] for k, v in inputs.items()}, options
