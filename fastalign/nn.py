"""``torch.nn.Module`` wrappers of the fused-linear losses: they take the model's hidden states and the lm_head
weight (never logits), compute per-token log-probs with :func:`fastalign.linear_logprobs`, and apply the loss.

* :class:`LinearCrossEntropy` — SFT / pre-training.
* :class:`LinearPolicyLoss` — PPO / GRPO / DAPO / GSPO on completion tokens.
* :class:`LinearDPOLoss` — the DPO family on chosen/rejected rows of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastalign.ops.cross_entropy import linear_cross_entropy
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.policy import policy_loss
from fastalign.ops.preference import check_dpo_options, dpo_loss_from_token_logps


class LinearCrossEntropy(torch.nn.Module):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets``; see :func:`fastalign.linear_cross_entropy`.

    Example:
        >>> import torch, fastalign
        >>> loss_fn = fastalign.nn.LinearCrossEntropy(label_smoothing=0.1)
        >>> hidden, weight = torch.randn(2, 8, 16, requires_grad=True), torch.randn(100, 16)
        >>> loss_fn(hidden, weight, torch.randint(0, 100, (2, 8))).backward()
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.backend = z_loss, softcap, backend

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap, backend=self.backend,
        )  # fmt: skip


class LinearPolicyLoss(torch.nn.Module):
    """The policy loss of :func:`fastalign.policy_loss` from the hidden states of the completion tokens.

    The per-token log-probs (and the entropy, only when ``entropy_coef`` needs it) come from
    :func:`fastalign.linear_logprobs` with this module's ``temperature`` and ``softcap`` — the same temperature
    the rollout sampled with, as TRL divides the logits by it.

    ``forward(hidden [B, T, D], weight [V, D], targets [B, T], old_logp [B, T], advantages [B] | [B, T], *,
    mask=None, ref_logp=None, is_weights=None, num_items_in_batch=None, bias=None) -> (loss, metrics)``;
    ``mask`` defaults to ``targets != ignore_index``.

    Example:
        >>> import torch, fastalign
        >>> loss_fn = fastalign.nn.LinearPolicyLoss(loss_type="dapo", clip_eps_high=0.28)
        >>> hidden, weight = torch.randn(4, 6, 16, requires_grad=True), torch.randn(50, 16)
        >>> targets = torch.randint(0, 50, (4, 6))
        >>> old_logp = fastalign.linear_logprobs(hidden.detach(), weight, targets)
        >>> loss, metrics = loss_fn(hidden, weight, targets, old_logp, advantages=torch.randn(4))
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        softcap: float | None = None,
        ignore_index: int = -100,
        clip_eps_low: float = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        loss_agg_mode: str = "token-mean",
        loss_type: str | None = None,
        importance_sampling_level: str = "token",
        entropy_coef: float = 0.0,
        max_completion_length: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature, self.softcap, self.ignore_index, self.backend = temperature, softcap, ignore_index, backend
        self.loss_options = {
            "clip_eps_low": clip_eps_low, "clip_eps_high": clip_eps_high, "dual_clip": dual_clip,
            "kl_coef": kl_coef, "kl_estimator": kl_estimator, "loss_agg_mode": loss_agg_mode,
            "loss_type": loss_type, "importance_sampling_level": importance_sampling_level,
            "entropy_coef": entropy_coef, "max_completion_length": max_completion_length,
        }  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        is_weights: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        need_entropy = self.loss_options["entropy_coef"] != 0
        out = linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature, softcap=self.softcap,
            ignore_index=self.ignore_index, return_entropy=need_entropy, backend=self.backend,
        )  # fmt: skip
        logp, entropy = out if need_entropy else (out, None)
        if mask is None:
            mask = targets != self.ignore_index
        return policy_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, is_weights=is_weights,
            num_items_in_batch=num_items_in_batch, backend=self.backend, **self.loss_options,
        )  # fmt: skip


class LinearDPOLoss(torch.nn.Module):
    """The DPO family (:func:`fastalign.dpo_loss`) from hidden states, chosen rows first and rejected rows second.

    ``forward(hidden [2B, T, D], weight [V, D], targets [2B, T], *, ref_chosen_logps=None, ref_rejected_logps=None,
    ref_hidden=None, ref_weight=None, bias=None, ref_bias=None) -> (loss, metrics)``.

    * ``targets`` hold the completion token ids and ``ignore_index`` elsewhere (prompt, padding); sequence
      log-probs are sums over completion tokens.
    * The reference is either precomputed (``ref_chosen_logps``, ``ref_rejected_logps``: ``[B]`` sums over the
      completion tokens, as TRL's ``precompute_ref_log_probs`` stores them; zeros for reference-free SimPO/CPO)
      or computed here without gradient from a reference model's ``(ref_hidden, ref_weight[, ref_bias])``.
    * ``average_log_prob``: ``True`` length-normalises every type's log-probs (SimPO style), ``False`` none;
      ``None`` (default) averages exactly for ``ipo`` and ``sigmoid_norm``, as TRL 1.x does.
    * ``rpo_alpha``: adds ``rpo_alpha ·`` the mean NLL of the chosen completion tokens (RPO).

    The loss is the mean over pairs. ``metrics`` (detached): ``chosen_rewards`` / ``rejected_rewards`` ``[B]``
    (``β·(logp − ref)`` of summed log-probs), ``reward_accuracy``, ``reward_margin``, ``chosen_logps`` /
    ``rejected_logps`` ``[B]`` and ``nll_loss`` when ``rpo_alpha`` is set.

    Example:
        >>> import torch, fastalign
        >>> loss_fn = fastalign.nn.LinearDPOLoss(beta=0.1)
        >>> hidden, weight = torch.randn(4, 7, 16, requires_grad=True), torch.randn(60, 16)
        >>> targets = torch.randint(0, 60, (4, 7)); targets[:, :3] = -100   # 2 pairs, 3 prompt tokens
        >>> loss, metrics = loss_fn(hidden, weight, targets, ref_hidden=hidden.detach(), ref_weight=weight)
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        loss_weights: Sequence[float] | None = None,
        average_log_prob: bool | None = None,
        rpo_alpha: float | None = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.types, self.weights = check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, loss_weights)
        self.beta, self.label_smoothing, self.discopop_tau = beta, label_smoothing, discopop_tau
        self.average_log_prob, self.rpo_alpha, self.ignore_index = average_log_prob, rpo_alpha, ignore_index
        self.temperature, self.softcap, self.backend = temperature, softcap, backend

    def _token_logps(self, hidden, weight, targets, bias) -> torch.Tensor:
        return linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature, softcap=self.softcap,
            ignore_index=self.ignore_index, backend=self.backend,
        )  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        *,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] % 2:
            raise ValueError(f"targets must be [2B, T] (chosen rows, then rejected rows), got {tuple(targets.shape)}")
        pairs = targets.shape[0] // 2
        token_logps = self._token_logps(hidden, weight, targets, bias)
        if ref_hidden is not None or ref_weight is not None:
            if ref_hidden is None or ref_weight is None or ref_chosen_logps is not None:
                raise ValueError(
                    "give the reference as (ref_hidden, ref_weight) or as precomputed ref_*_logps, not both"
                )
            with torch.no_grad():
                ref_summed = self._token_logps(ref_hidden, ref_weight, targets, ref_bias).sum(-1)
        elif ref_chosen_logps is not None and ref_rejected_logps is not None:
            for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
                if not isinstance(value, torch.Tensor) or value.shape != (pairs,):
                    raise ValueError(f"{name} must be a [B] = ({pairs},) tensor, got {getattr(value, 'shape', value)}")
            ref_summed = torch.cat([ref_chosen_logps, ref_rejected_logps]).to(token_logps.dtype).detach()
        else:
            raise ValueError(
                "LinearDPOLoss needs a reference: (ref_hidden, ref_weight) or ref_chosen_logps and ref_rejected_logps "
                "(zeros for reference-free SimPO/CPO)"
            )
        losses, sums, lengths = dpo_loss_from_token_logps(
            token_logps, targets != self.ignore_index, ref_summed, beta=self.beta, loss_type=self.types,
            label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau, loss_weights=self.weights,
            average_log_prob=self.average_log_prob, backend=self.backend,
        )  # fmt: skip
        loss = losses.sum() / max(pairs, 1)
        metrics = _dpo_metrics(self.beta, sums.detach(), ref_summed, pairs)
        if self.rpo_alpha is not None:
            nll = -sums[:pairs].sum() / lengths[:pairs].sum().clamp_min(1)
            loss = loss + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics


def _dpo_metrics(beta: float, summed: torch.Tensor, ref_summed: torch.Tensor, pairs: int) -> dict[str, torch.Tensor]:
    rewards = beta * (summed - ref_summed)
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().sum() / max(pairs, 1),
        "reward_margin": (chosen_rewards - rejected_rewards).sum() / max(pairs, 1),
        "chosen_logps": summed[:pairs],
        "rejected_logps": summed[pairs:],
    }
