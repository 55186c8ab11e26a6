"""What the benchmark runs: each op's implementations (fastalign's backends, the eager baseline, the peers) as
functions of one set of inputs, and the shapes of each preset."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fastalign

OPS = ("linear_logprobs", "linear_cross_entropy", "logprobs_from_logits")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    mode: str
    n: int
    d: int
    v: int
    dtype: str
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    description: str
    device: str
    dtype: str
    linear_shape: tuple[int, int, int]  # N, D, V
    logits_shape: tuple[int, int]  # N, V
    repeats: int


PRESETS = {
    "cpu": Preset("the CPU targets of issue 2", "cpu", "float32", (4096, 512, 32768), (4096, 32768), 5),
    "demo": Preset("a quick CPU run for `make demo`", "cpu", "float32", (1024, 512, 32768), (1024, 32768), 3),
    "gpu": Preset("the H100 targets of issue 2", "cuda", "bfloat16", (16384, 4096, 131072), (16384, 151936), 0),
    "gpu-small": Preset("a quick GPU smoke run", "cuda", "bfloat16", (4096, 2048, 32768), (4096, 32768), 0),
}


def _eager_linear_logprobs(hidden, weight, targets):
    """What TRL does: materialise the logits, float32 log_softmax, gather."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _eager_cross_entropy(hidden, weight, targets):
    """What transformers' causal-LM loss does: float32 logits, then cross_entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _eager_logprobs_from_logits(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _liger(reduction: str):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
    sign = -1.0 if reduction == "none" else 1.0  # per-token losses are -logp
    return lambda hidden, weight, targets: sign * loss(weight, hidden, targets)


def _cce(reduction: str):
    from cut_cross_entropy import linear_cross_entropy

    sign = -1.0 if reduction == "none" else 1.0
    return lambda hidden, weight, targets: sign * linear_cross_entropy(hidden, weight, targets, reduction=reduction)


def implementations(op: str, device: str) -> dict[str, Callable]:
    """``{impl name: fn(*inputs)}`` for one op; peers only where installed and on CUDA (they are GPU kernels)."""
    on_gpu = device == "cuda"
    fastalign_backends = ["torch", "triton"] if on_gpu else ["torch"]
    if op == "logprobs_from_logits":
        impls = {"eager": _eager_logprobs_from_logits}
        for backend in fastalign_backends:
            impls[f"fastalign-{backend}"] = lambda x, t, b=backend: fastalign.logprobs_from_logits(x, t, backend=b)
        return impls
    if op == "linear_logprobs":
        impls = {"eager": _eager_linear_logprobs}
        fused, peer_reduction = fastalign.linear_logprobs, "none"
    else:
        impls = {"eager": _eager_cross_entropy}
        fused, peer_reduction = fastalign.linear_cross_entropy, "mean"
    for backend in fastalign_backends:
        impls[f"fastalign-{backend}"] = lambda h, w, t, b=backend, f=fused: f(h, w, t, backend=b)
    if on_gpu and importlib.util.find_spec("liger_kernel") is not None:
        impls["liger-kernel"] = _liger(peer_reduction)
    if on_gpu and importlib.util.find_spec("cut_cross_entropy") is not None:
        impls["cut-cross-entropy"] = _cce(peer_reduction)
    return impls


def make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """Seeded inputs on the case's device; floating inputs require grad for ``fwd+bwd``."""
    gen = torch.Generator(device=case.device).manual_seed(0)
    dtype = DTYPES[case.dtype]
    needs_grad = case.mode == "fwd+bwd"
    targets = torch.randint(0, case.v, (case.n,), generator=gen, device=case.device)
    if case.op == "logprobs_from_logits":
        logits = torch.randn(case.n, case.v, generator=gen, device=case.device, dtype=dtype) * 2
        return logits.requires_grad_(needs_grad), targets
    hidden = torch.randn(case.n, case.d, generator=gen, device=case.device, dtype=dtype)
    # A realistic logit scale (std about 1) for a freshly initialised head.
    weight = torch.randn(case.v, case.d, generator=gen, device=case.device, dtype=dtype) / case.d**0.5
    return hidden.requires_grad_(needs_grad), weight.requires_grad_(needs_grad), targets


def make_step(case: Case, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One timed step: forward only (under no_grad, as for reference/old-policy log-probs) or forward+backward."""
    fn = implementations(case.op, case.device)[case.impl]
    if case.mode == "fwd":

        def step() -> None:
            with torch.no_grad():
                fn(*inputs)

        return step

    leaves = [x for x in inputs if x.is_floating_point()]

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = fn(*inputs)
        out.sum().backward()

    return step


def matmul_flops(case: Case) -> float:
    """Matmul work of the linear ops: 2·N·D·V forward, 6·N·D·V forward+backward."""
    if case.op == "logprobs_from_logits":
        return 0.0
    return (2.0 if case.mode == "fwd" else 6.0) * case.n * case.d * case.v


def min_bytes(case: Case) -> float:
    """Least memory traffic of ``logprobs_from_logits``: read the logits once (+ read and write d_logits once)."""
    if case.op != "logprobs_from_logits":
        return 0.0
    size = case.n * case.v * DTYPES[case.dtype].itemsize
    return size if case.mode == "fwd" else 3.0 * size
