"""Backend reporting, the auto choice, the FASTALIGN_BACKEND override and clear unavailability errors."""

import pytest
import torch

import fastalign
from fastalign.ops import dispatch
from fastalign.ops.dispatch import resolve_backend, scratch_budget

CPU = torch.device("cpu")


def test_backends_report_availability_with_reasons():
    report = fastalign.backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"].available
    if not torch.cuda.is_available():
        assert not report["cuda"].available and "fastalign._C" in report["cuda"].reason
    assert all(status.reason for status in report.values())


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    assert resolve_backend("auto", CPU, torch.float32) == "torch"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    assert resolve_backend("auto", CPU, torch.float32) == "triton"  # the interpreter runs CPU tensors
    monkeypatch.setenv("FASTALIGN_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="FASTALIGN_BACKEND must be one of"):
        resolve_backend("auto", CPU, torch.float32)


def test_environment_override_is_used_by_the_ops(monkeypatch):
    """With FASTALIGN_BACKEND=triton an auto call on CPU runs the (interpreted) triton kernels."""
    calls = []
    from fastalign.ops import _triton_backend

    original = _triton_backend.linear_forward
    monkeypatch.setattr(_triton_backend, "linear_forward", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    fastalign.linear_logprobs(torch.randn(3, 8), torch.randn(20, 8), torch.randint(0, 20, (3,)))
    assert calls == [1]


def test_explicit_unavailable_backend_raises_with_reason():
    with pytest.raises(fastalign.BackendUnavailableError, match="no kernel for linear stats; it runs on torch, triton"):
        fastalign.linear_logprobs(
            torch.randn(3, 8), torch.randn(20, 8), torch.zeros(3, dtype=torch.long), backend="cuda"
        )
    with pytest.raises(fastalign.BackendUnavailableError, match="need CUDA tensors, the inputs are on cpu"):
        fastalign.logprobs_from_logits(torch.randn(3, 20), torch.zeros(3, dtype=torch.long), backend="cuda")
    with pytest.raises(fastalign.BackendUnavailableError, match="float64"):
        fastalign.linear_logprobs(
            torch.randn(3, 8, dtype=torch.float64),
            torch.randn(20, 8, dtype=torch.float64),
            torch.zeros(3, dtype=torch.long),
            backend="triton",
        )


def test_triton_on_cpu_without_interpreter_explains_itself(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_interpreting", lambda: False)
    with pytest.raises(fastalign.BackendUnavailableError, match="triton kernels need CUDA tensors"):
        resolve_backend("triton", CPU, torch.float32)


def test_scratch_budget_setting(monkeypatch):
    monkeypatch.delenv("FASTALIGN_SCRATCH_MB", raising=False)
    assert scratch_budget(CPU) == 32 << 20
    monkeypatch.setenv("FASTALIGN_SCRATCH_MB", "4")
    assert scratch_budget(CPU) == 4 << 20
    fastalign.set_scratch_budget(12345)
    try:
        assert scratch_budget(CPU) == 12345
    finally:
        fastalign.set_scratch_budget(None)
    with pytest.raises(ValueError, match="nbytes must be None or an int > 0"):
        fastalign.set_scratch_budget(0)
    monkeypatch.setenv("FASTALIGN_SCRATCH_MB", "lots")
    with pytest.raises(ValueError, match="FASTALIGN_SCRATCH_MB must be a number"):
        scratch_budget(CPU)
