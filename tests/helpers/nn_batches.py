"""Batches of the fused-linear modules (hidden, weight, targets with a prompt and a padded row) and the reference
composition of the DPO module: materialised float64 logits, then the reference loss."""

import torch

from fastalign.ops import reference, reference_losses

VOCAB, WIDTH = 97, 24


def make_batch(rows=4, width=7, prompt=2, seed=0, dim=WIDTH, vocab=VOCAB):
    """float64 hidden [rows, width, dim], weight [vocab, dim], targets with a prompt and a padded row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / dim**0.5 * 2
    targets = torch.randint(0, vocab, (rows, width), generator=gen)
    targets[:, :prompt] = -100
    targets[-1, -2:] = -100  # a padded row
    return hidden, weight, targets


def reference_dpo(
    hidden,
    weight,
    targets,
    ref_sums,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    loss_weights=None,
    average_log_prob=None,
    rpo_alpha=None,
):
    token_logps = reference.linear_logprobs(hidden, weight, targets)
    sums = token_logps.sum(-1)
    lengths = (targets != -100).sum(-1).double()
    pairs = targets.shape[0] // 2
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    total = 0
    for name, wt in zip(types, loss_weights or [1.0] * len(types), strict=True):
        average = name in ("ipo", "sigmoid_norm") if average_log_prob is None else average_log_prob
        scale = 1 / lengths if average else 1.0
        policy, ref = sums * scale, ref_sums * scale
        losses, _, _ = reference_losses.dpo_loss(
            policy[:pairs],
            policy[pairs:],
            ref[:pairs],
            ref[pairs:],
            beta=beta,
            loss_type=name,
            label_smoothing=label_smoothing,
        )
        total = total + wt * losses.mean()
    if rpo_alpha is not None:
        total = total + rpo_alpha * (-sums[:pairs].sum() / lengths[:pairs].sum())
    return total
