"""What the benchmark runs: each op's implementations (fastalign's backends, the eager baseline, the peers, the
bare lm_head matmuls as the floor) as functions of one set of inputs, and the shapes of each preset."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import fastalign

OPS = (
    # the core ops (issue 2)
    "linear_logprobs",
    "linear_cross_entropy",
    "logprobs_from_logits",
    # the alignment losses (issue 3)
    "linear_dpo",
    "linear_grpo",
    "policy_loss",
    # the DPO reduction + loss from per-token log-probs, for the CUDA kernels (issue 4)
    "dpo_loss",
    # the distillation divergence between a student's and a teacher's head (issue 18)
    "linear_distill",
)
# Ops with a CUDA C++ kernel: they get a fastalign-cuda row when fastalign._C is built and sees the GPU.
CUDA_OPS = ("logprobs_from_logits", "policy_loss", "dpo_loss")
# Ops on per-token log-probs (no matmul): their shape is (rows, T) from the preset's policy_shape.
TOKEN_LOSSES = ("policy_loss", "dpo_loss")
MODES = ("fwd", "fwd+bwd")
# Losses are measured as training steps only.
TRAINING_ONLY = ("linear_dpo", "linear_grpo")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DPO_BETA = 0.1
IGNORE_INDEX = -100  # the label of a token without loss (a prompt's)
# The vocabulary chunk TRL 1.16's trainers pass to trl.kernels.ChunkedLogProbFunction
# (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE; importing that module pulls in TRL's whole trainer stack).
TRL_CHUNK_SIZE = 32768
# linear_distill's generalized JSD (TRL's DistillationConfig.beta; 0.5 is TRL's default) and temperature. The
# teacher's head has the student's width D, so one case's shape serves both heads.
DISTILL_BETA = 0.5
DISTILL_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    mode: str
    n: int  # tokens (rows x sequence length for the sequence losses)
    d: int
    v: int
    dtype: str
    device: str
    t: int = 0  # sequence length of the sequence losses

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    description: str
    device: str
    dtype: str
    linear_shape: tuple[int, int, int]  # N, D, V
    logits_shape: tuple[int, int]  # N, V
    sequence_shape: tuple[int, int]  # rows, T of linear_dpo (2B rows) and linear_grpo (B rows); D, V as linear
    policy_shape: tuple[int, int]  # B, T of policy_loss alone (B pairs = 2B rows for dpo_loss)
    repeats: int
    cases: tuple[tuple[str, str], ...] = ()  # the (op, mode) pairs run by default; () = every op in every mode
    impls: tuple[str, ...] = ()  # the implementations run by default (where they run); () = all

    def default_cases(self) -> list[tuple[str, str]]:
        """The preset's ``(op, mode)`` pairs, in the order they run."""
        if self.cases:
            return list(self.cases)
        return [(op, mode) for op in OPS for mode in MODES if not (mode == "fwd" and op in TRAINING_ONLY)]

    def shape(self, op: str) -> tuple[int, int, int, int]:
        """``(n, d, v, t)`` of one op."""
        if op == "logprobs_from_logits":
            return self.logits_shape[0], 0, self.logits_shape[1], 0
        if op in TRAINING_ONLY:
            rows, t = self.sequence_shape
            return rows * t, self.linear_shape[1], self.linear_shape[2], t
        if op in TOKEN_LOSSES:
            rows, t = self.policy_shape
            rows *= 2 if op == "dpo_loss" else 1
            return rows * t, 0, 0, t
        return (*self.linear_shape, 0)


# A table, a preset a row (`fmt: skip` keeps it one): description, device, dtype; N,D,V of the linear ops, N,V of
# logprobs_from_logits, rows,T of the sequence losses, B,T of the token losses; timed repeats per CPU case.
PRESETS = {
    "cpu": Preset("the CPU targets of issues 2 and 3", "cpu", "float32",
                  (4096, 512, 32768), (4096, 32768), (8, 512), (64, 1024), 5),
    "demo": Preset("a quick CPU run for `make demo`", "cpu", "float32",
                   (1024, 512, 32768), (1024, 32768), (4, 256), (32, 512), 3),
    "tiny": Preset("every op at toy sizes, for tests", "cpu", "float32",
                   (64, 32, 512), (64, 512), (4, 16), (8, 32), 1),
    "gpu": Preset("the H100 targets of issues 2 and 3", "cuda", "bfloat16",
                  (16384, 4096, 131072), (16384, 151936), (8, 2048), (256, 4096), 0),
    "gpu-small": Preset("a quick GPU smoke run", "cuda", "bfloat16",
                        (4096, 2048, 32768), (4096, 32768), (4, 1024), (64, 2048), 0),
}  # fmt: skip
# bench/gpu_check.sh's core benchmark: the gpu preset's core-op shapes, against eager, the floor and the peers.
PRESETS["gpu-core"] = replace(
    PRESETS["gpu"],
    description="the GPU check's core benchmark",
    cases=(
        ("linear_logprobs", "fwd+bwd"),
        ("linear_cross_entropy", "fwd+bwd"),
        ("logprobs_from_logits", "fwd"),
        ("logprobs_from_logits", "fwd+bwd"),
    ),
    impls=(
        "eager",
        "fastalign-triton",
        "fastalign-fused",
        "fastalign-cuda",
        "lm-head-matmuls",
        "trl-chunked",
        "liger-kernel",
        "cut-cross-entropy",
        "fastalign-tiles",
    ),
)
# The shapes a rehearsal (``python -m bench --rehearse``) runs a GPU preset's cases at, on the CPU: small enough
# for Triton's interpreter (a few seconds for the gpu-core preset), vocabularies not a multiple of any tile.
REHEARSAL = Preset(
    "a GPU preset's cases rehearsed on the CPU", "cpu", "float32", (32, 16, 100), (32, 100), (2, 8), (4, 16), 1
)


def _eager_linear_logprobs(hidden, weight, targets):
    """What TRL does: materialise the logits, float32 log_softmax, gather."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _eager_cross_entropy(hidden, weight, targets):
    """What transformers' causal-LM loss does: float32 logits, then cross_entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def eager_logprobs_from_logits(logits, targets):
    """``[...]`` log-probs of ``targets`` ``[...]`` (int64) under ``logits`` ``[..., V]``: float32 log_softmax."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _eager_sequence_logps(hidden, weight, targets):
    mask = targets != IGNORE_INDEX
    logp = _eager_linear_logprobs(hidden, weight, targets.clamp_min(0))
    return (logp * mask).sum(-1)


def _eager_linear_dpo(hidden, weight, targets, ref_hidden):
    """TRL-style sigmoid DPO on materialised logits, the reference model under no_grad."""
    with torch.no_grad():
        ref = _eager_sequence_logps(ref_hidden, weight, targets)
    policy = _eager_sequence_logps(hidden, weight, targets)
    pairs = targets.shape[0] // 2
    margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
    return -F.logsigmoid(DPO_BETA * margin).mean()


def eager_clipped_surrogate(logp, old_logp, advantages, mask, clip: tuple[float, float] = (0.8, 1.28)):
    """The clipped policy-gradient loss, token mean over ``mask``: ``logp``, ``old_logp``, ``mask`` ``[N, T]``,
    ``advantages`` broadcast against them (``[N, 1]`` per sequence, ``[N, T]`` per token); the ratio clipped to
    ``clip`` (DAPO's clip-higher by default)."""
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * advantages, torch.clamp(ratio, *clip) * advantages)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _eager_token_policy_loss(logp, old_logp, advantages, mask):
    """TRL-style DAPO loss from per-token log-probs ``[N, T]`` and per-sequence advantages ``[N]``."""
    return eager_clipped_surrogate(logp, old_logp, advantages.unsqueeze(-1), mask)


def eager_dpo_loss(token_logps, mask, ref_logps):
    """TRL-style sigmoid DPO from per-token log-probs: masked sums, then the loss."""
    sums = (token_logps * mask).sum(-1) - ref_logps
    pairs = sums.shape[0] // 2
    return -F.logsigmoid(DPO_BETA * (sums[:pairs] - sums[pairs:])).mean()


def _eager_linear_distill(student_hidden, student_weight, teacher_hidden, teacher_weight, targets):
    """The generalized JSD as one would write it in PyTorch: both heads' full logits, their log-softmax, the
    mixture ``m = (1 - β) p_s + β p_t`` by logsumexp, then ``β KL(p_t ‖ m) + (1 - β) KL(p_s ‖ m)`` per token."""
    student = F.log_softmax((student_hidden @ student_weight.T).float() / DISTILL_TEMPERATURE, dim=-1)
    teacher = F.log_softmax((teacher_hidden @ teacher_weight.T).float() / DISTILL_TEMPERATURE, dim=-1)
    beta = torch.tensor(DISTILL_BETA)
    mixture = torch.logsumexp(torch.stack([student + torch.log1p(-beta), teacher + torch.log(beta)]), dim=0)
    per_token = beta * (teacher.exp() * (teacher - mixture)).sum(-1) + (1 - beta) * (
        student.exp() * (student - mixture)
    ).sum(-1)
    valid = targets != IGNORE_INDEX
    return torch.where(valid, per_token, 0.0).sum() / valid.sum().clamp_min(1)


def _eager_linear_grpo(hidden, weight, targets, old_logp, advantages):
    logp = _eager_linear_logprobs(hidden, weight, targets)
    return _eager_token_policy_loss(logp, old_logp, advantages, torch.ones_like(logp))


def _liger_linear(op: str):
    if op == "linear_distill":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=DISTILL_BETA,
            temperature=DISTILL_TEMPERATURE,
            compiled=torch.cuda.is_available(),  # its torch path as is on the CPU (no inductor build there)
        )
        return lambda sh, sw, th, tw, targets: loss(sh, sw, th, tw, targets)
    if op == "linear_dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss = LigerFusedLinearDPOLoss(beta=DPO_BETA)
        return lambda hidden, weight, targets, ref_hidden: loss(weight, hidden, targets, None, ref_hidden, weight)[0]
    if op == "linear_grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_high=0.28, loss_type="dapo")
        return lambda hidden, weight, targets, old_logp, advantages: loss(
            hidden, weight, targets, torch.ones_like(targets), advantages, old_per_token_logps=old_logp
        )[0]
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    reduction = "none" if op == "linear_logprobs" else "mean"
    loss = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
    sign = -1.0 if reduction == "none" else 1.0  # per-token losses are -logp
    return lambda hidden, weight, targets: sign * loss(weight, hidden, targets)


def _cce(op: str):
    from cut_cross_entropy import linear_cross_entropy

    reduction = "none" if op == "linear_logprobs" else "mean"
    sign = -1.0 if reduction == "none" else 1.0
    return lambda hidden, weight, targets: sign * linear_cross_entropy(hidden, weight, targets, reduction=reduction)


def _trl_chunked(op: str):
    """TRL 1.16's chunked log-prob kernel (``trl.kernels.ChunkedLogProbFunction``: cuBLAS tiles of the logits,
    folded by a Triton kernel; torch ops off CUDA), log-probs only, with the chunk TRL's trainers pass."""
    if op == "linear_distill":
        return _trl_divergence()
    from trl.kernels import ChunkedLogProbFunction

    _trl_backward_without_datasets()

    def logprobs(hidden, weight, targets):
        return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, TRL_CHUNK_SIZE, None, 1.0, ())[0]

    if op == "linear_logprobs":
        return logprobs
    return lambda hidden, weight, targets: -logprobs(hidden, weight, targets).mean()


def _trl_divergence() -> Callable:
    """TRL 1.16's chunked generalized JSD (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``), reduced
    as its DistillationTrainer does: the mean over the counted tokens."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets):
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            student_hidden,
            student_weight,
            None,
            teacher_hidden,
            teacher_weight,
            None,
            DISTILL_BETA,
            DISTILL_TEMPERATURE,
        )
        valid = targets != IGNORE_INDEX
        return torch.where(valid, divergence, 0.0).sum() / valid.sum().clamp_min(1)

    return loss


def _trl_backward_without_datasets() -> None:
    """TRL 1.16's ``ChunkedLogProbFunction.backward`` imports ``trl.trainer.utils`` for one context manager,
    ``maybe_gather_lm_head_ctx`` (DeepSpeed ZeRO-3 gathering; a null context otherwise), and that module imports
    ``datasets``, which the GPU machine's image lacks. Where it does not import, stand in for it with that null
    context: the same kernels run, as they do in TRL without ZeRO-3."""
    try:
        import trl.trainer.utils  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("trl.trainer.utils")
        stand_in.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stand_in
        print(
            "trl.trainer.utils does not import here: TRL's backward gets its ZeRO-3 gather as a null context",
            file=sys.stderr,
        )


class _LmHeadMatmuls(torch.autograd.Function):
    """The floor of a fused lm_head op: its matmuls alone, at the same shapes and dtype. Forward
    ``logits = hidden @ weight.T``; backward ``d_hidden = G @ weight`` and ``d_weight = G.T @ hidden`` with the
    logits standing in for their gradient ``G`` (no softmax, no loss, no reduction)."""

    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.T
        ctx.save_for_backward(hidden, weight, logits)
        return logits[:1, :1].float().sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, logits = ctx.saved_tensors
        return logits @ weight, logits.T @ hidden


def _lm_head_matmuls(hidden, weight, targets):
    return _LmHeadMatmuls.apply(hidden, weight)


def _fastalign_fused(op: str) -> Callable:
    """The nn modules with the gradient formed in the forward (``gradient_in_forward=True``: chunked logits,
    6NDV), Triton for the logits kernels: the path that was their CUDA default, measured beside the autograd one
    (``fastalign-triton``) because ``bench.roofline`` predicts it slower."""
    if op == "linear_cross_entropy":
        loss = fastalign.nn.LinearCrossEntropy(gradient_in_forward=True, backend="triton")
        return lambda h, w, t: loss(h, w, t)
    if op == "linear_dpo":
        loss = fastalign.nn.LinearDPOLoss(beta=DPO_BETA, gradient_in_forward=True, backend="triton")
        return lambda h, w, t, ref_h: loss(h, w, t, ref_hidden=ref_h, ref_weight=w)[0]
    loss = fastalign.nn.LinearPolicyLoss(
        loss_type="dapo", clip_eps_high=0.28, gradient_in_forward=True, backend="triton"
    )
    return lambda h, w, t, old, adv: loss(h, w, t, old, adv)[0]


def _fastalign_tiles(op: str) -> Callable:
    """The Triton backend with the tile backward (``set_linear_backward("tiles")``, exact and atomic), measured
    beside the slab default (``fastalign-triton``): ``bench.roofline`` predicts it slower exact, and only a GPU run
    says by how much. The design is read when the forward runs, so it is set around the forward alone."""
    plain = _fastalign(op, "triton")

    def run(*inputs):
        fastalign.set_linear_backward("tiles")
        try:
            return plain(*inputs)
        finally:
            fastalign.set_linear_backward(None)

    return run


def _fastalign(op: str, backend: str) -> Callable:
    if op == "logprobs_from_logits":
        return lambda logits, targets: fastalign.logprobs_from_logits(logits, targets, backend=backend)
    if op == "linear_logprobs":
        return lambda h, w, t: fastalign.linear_logprobs(h, w, t, backend=backend)
    if op == "linear_cross_entropy":
        return lambda h, w, t: fastalign.linear_cross_entropy(h, w, t, backend=backend)
    if op == "linear_dpo":
        loss = fastalign.nn.LinearDPOLoss(beta=DPO_BETA, backend=backend)
        return lambda h, w, t, ref_h: loss(h, w, t, ref_hidden=ref_h, ref_weight=w)[0]
    if op == "linear_grpo":
        loss = fastalign.nn.LinearPolicyLoss(loss_type="dapo", clip_eps_high=0.28, backend=backend)
        return lambda h, w, t, old, adv: loss(h, w, t, old, adv)[0]
    if op == "linear_distill":
        return lambda sh, sw, th, tw, t: fastalign.linear_distill_loss(
            sh, sw, th, tw, t, beta=DISTILL_BETA, temperature=DISTILL_TEMPERATURE, backend=backend
        )
    if op == "dpo_loss":
        return lambda logps, mask, ref: fastalign.dpo_loss_from_token_logps(
            logps, mask, ref, beta=DPO_BETA, backend=backend
        )[0].mean()
    return lambda logp, old, adv, mask: fastalign.policy_loss(
        logp, old, adv, mask, loss_type="dapo", clip_eps_high=0.28, backend=backend
    )[0]


_EAGER = {
    "linear_logprobs": _eager_linear_logprobs,
    "linear_cross_entropy": _eager_cross_entropy,
    "logprobs_from_logits": eager_logprobs_from_logits,
    "linear_dpo": _eager_linear_dpo,
    "linear_grpo": _eager_linear_grpo,
    "policy_loss": _eager_token_policy_loss,
    "dpo_loss": eager_dpo_loss,
    "linear_distill": _eager_linear_distill,
}


# Where each peer comes from (the GPU machine has none of them unless their wheels are carried).
PEER_MODULES = {"trl-chunked": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}
# The peers that also run on the CPU set, per op: their CPU path is plain torch (TRL's chunked kernels fall back
# to torch ops off CUDA; liger's chunked JSD loss is torch, uncompiled there), so the CPU preset puts fastalign's
# torch backend side by side with them.
CPU_PEERS = {
    "linear_distill": ("trl-chunked", "liger-kernel"),
    # TRL's chunked log-prob op folds its [4096 x 32768] tiles with torch ops off CUDA (issue 14's CPU comparison).
    "linear_logprobs": ("trl-chunked",),
    "linear_cross_entropy": ("trl-chunked",),
}


def _candidates(op: str) -> dict[str, Callable[[], Callable]]:
    """``{impl name: factory of fn(*inputs)}`` for every implementation an op has anywhere."""
    candidates = {"eager": lambda: _EAGER[op]}
    for backend in ("torch", "triton", "cuda"):
        if backend != "cuda" or op in CUDA_OPS:
            candidates[f"fastalign-{backend}"] = functools.partial(_fastalign, op, backend)
    if op in ("linear_cross_entropy", "linear_dpo", "linear_grpo"):
        candidates["fastalign-fused"] = functools.partial(_fastalign_fused, op)
    if op in ("linear_logprobs", "linear_cross_entropy"):
        candidates["fastalign-tiles"] = functools.partial(_fastalign_tiles, op)
        candidates[FLOOR_IMPL] = lambda: _lm_head_matmuls
    if op in ("linear_logprobs", "linear_cross_entropy", "linear_distill"):
        candidates["trl-chunked"] = functools.partial(_trl_chunked, op)
    if op not in ("logprobs_from_logits", *TOKEN_LOSSES):
        candidates["liger-kernel"] = functools.partial(_liger_linear, op)
        if op not in (*TRAINING_ONLY, "linear_distill"):
            candidates["cut-cross-entropy"] = functools.partial(_cce, op)
    return candidates


def available(op: str, device: str, kernels: bool | None = None) -> list[str]:
    """The implementations of ``op`` that run here. ``kernels`` (default: on CUDA): the GPU set — Triton, the
    CUDA kernels where ``fastalign._C`` runs, the floor, and TRL / the peers where importable; otherwise eager,
    fastalign's torch backend and the op's :data:`CPU_PEERS` where importable. A rehearsal asks for the GPU set
    on the CPU (Triton then interprets)."""
    kernels = device == "cuda" if kernels is None else kernels

    def runs_here(name: str) -> bool:
        if name in ("eager", "fastalign-torch"):
            return True
        if not kernels and name not in CPU_PEERS.get(op, ()):
            return False
        if name == "fastalign-cuda":
            return device == "cuda" and fastalign.backends()["cuda"].available
        module = PEER_MODULES.get(name)
        return module is None or importlib.util.find_spec(module) is not None

    return [name for name in _candidates(op) if runs_here(name)]


def implementations(op: str, device: str, kernels: bool | None = None) -> dict[str, Callable]:
    """``{impl name: fn(*inputs)}`` for the implementations of ``op`` that run here (see :func:`available`)."""
    candidates = _candidates(op)
    return {name: candidates[name]() for name in available(op, device, kernels)}


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """Seeded inputs on the case's device; the trained inputs require grad for ``fwd+bwd``."""
    gen = torch.Generator(device=case.device).manual_seed(0)
    dtype = DTYPES[case.dtype]
    needs_grad = case.mode == "fwd+bwd"

    def randn(*shape, scale=1.0, dtype=dtype):
        return torch.randn(*shape, generator=gen, device=case.device, dtype=dtype) * scale

    if case.op == "policy_loss":
        rows = case.n // case.t
        logp = -randn(rows, case.t, dtype=torch.float32).abs()
        old = logp + randn(rows, case.t, scale=0.2, dtype=torch.float32)
        mask = (randn(rows, case.t, dtype=torch.float32) > -1.5).float()
        return logp.requires_grad_(needs_grad), old, randn(rows, dtype=torch.float32), mask
    if case.op == "dpo_loss":
        rows = case.n // case.t
        logps = -randn(rows, case.t, dtype=torch.float32).abs()
        mask = (torch.arange(case.t, device=case.device) >= case.t // 4).float().expand(rows, -1).contiguous()
        return logps.requires_grad_(needs_grad), mask, randn(rows, dtype=torch.float32)
    targets = torch.randint(0, case.v, (case.n,), generator=gen, device=case.device)
    if case.op == "logprobs_from_logits":
        return randn(case.n, case.v, scale=2.0).requires_grad_(needs_grad), targets
    # A realistic logit scale (std about 1) for a freshly initialised head.
    weight = randn(case.v, case.d, scale=case.d**-0.5).requires_grad_(needs_grad)
    if case.op == "linear_distill":
        teacher_weight = randn(case.v, case.d, scale=2.0 * case.d**-0.5)  # a sharper teacher than the student
        return randn(case.n, case.d).requires_grad_(needs_grad), weight, randn(case.n, case.d), teacher_weight, targets
    if case.op not in TRAINING_ONLY:
        return randn(case.n, case.d).requires_grad_(needs_grad), weight, targets
    rows = case.n // case.t
    hidden = randn(rows, case.t, case.d).requires_grad_(needs_grad)
    targets = targets.view(rows, case.t)
    if case.op == "linear_dpo":
        targets[:, : case.t // 4] = IGNORE_INDEX  # the prompt
        return hidden, weight, targets, randn(rows, case.t, case.d)
    with torch.no_grad():
        old = fastalign.linear_logprobs(hidden, weight, targets) + randn(rows, case.t, scale=0.1, dtype=torch.float32)
    return hidden, weight, targets, old, randn(rows, dtype=torch.float32)


def make_step(case: Case, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One timed step: forward only (under no_grad, as for reference/old-policy log-probs) or forward+backward."""
    fn = _candidates(case.op)[case.impl]()
    if case.mode == "fwd":

        def step() -> None:
            with torch.no_grad():
                fn(*inputs)

        return step

    leaves = [x for x in inputs if x.requires_grad]

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        fn(*inputs).sum().backward()

    return step


FLOOR_IMPL = "lm-head-matmuls"  # not the op itself: no output to compare


def output_error(case: Case, inputs: tuple[torch.Tensor, ...]) -> float | None:
    """``max |out - eager| / max |eager|`` of the case's forward on its inputs: that an implementation computes
    the op at all (a peer's wrapper with the wrong sign or reduction shows here). None for eager and the floor."""
    if case.impl in ("eager", FLOOR_IMPL):
        return None
    with torch.no_grad():
        got = _candidates(case.op)[case.impl]()(*inputs).double()
        want = _EAGER[case.op](*inputs).double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def output_tolerance(case: Case) -> float:
    """How far from eager an implementation may land: eager rounds the logits to the inputs' dtype first."""
    return 1e-4 if case.dtype == "float32" else 3e-2


def matmul_flops(case: Case) -> float:
    """Matmul work of the linear ops: 2·N·D·V forward, 6·N·D·V forward+backward (+2·N·D·V for DPO's reference
    and for distillation's teacher, whose head runs forward only)."""
    if case.op in ("logprobs_from_logits", *TOKEN_LOSSES):
        return 0.0
    work = (2.0 if case.mode == "fwd" else 6.0) * case.n * case.d * case.v
    return work + (2.0 * case.n * case.d * case.v if case.op in ("linear_dpo", "linear_distill") else 0.0)


def min_bytes(case: Case) -> float:
    """Least memory traffic of the bandwidth-bound ops (0 for the matmul-bound ones).

    ``logprobs_from_logits``: read the logits once forward; read them and write ``d_logits`` once backward.
    ``policy_loss`` (float32 logp, old_logp, mask; per-sequence advantages): read the three forward; read them
    again and write ``d_logp`` backward. ``dpo_loss``: read the log-probs and the mask forward; read the mask and
    write ``d_logps`` backward.
    """
    if case.op == "logprobs_from_logits":
        size = case.n * case.v * DTYPES[case.dtype].itemsize
        return size if case.mode == "fwd" else 3.0 * size
    per_token = {"policy_loss": (12, 28), "dpo_loss": (8, 16)}.get(case.op)
    if per_token is None:
        return 0.0
    return case.n * per_token[0 if case.mode == "fwd" else 1]
