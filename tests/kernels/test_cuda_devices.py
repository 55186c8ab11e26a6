"""The CUDA backend launches on its tensors' device and leaves torch's current device as it found it.

``fastalign._C.set_device`` makes a device current for the calling thread and does not restore it; torch and the
extension share the thread's current CUDA context, so an op on a tensor off torch's current device would change
``torch.cuda.current_device()``. CPU: ``fastalign.ops._cuda_ext.launch_stream`` on emulated devices
(``tests/helpers/fake_cuda.py``). GPU (marked, two devices): the ops themselves.
"""

import functools
from types import SimpleNamespace

import pytest
import torch
from helpers.fake_cuda import FakeCudaDevices

import fastalign
from fastalign.ops import _cuda_ext, policy


def on(device: str) -> SimpleNamespace:
    """A stand-in for a tensor on ``device`` (all ``launch_stream`` reads of it)."""
    return SimpleNamespace(device=torch.device(device))


@pytest.fixture
def devices(monkeypatch):
    devices = FakeCudaDevices(monkeypatch, count=2, current=0)
    monkeypatch.setattr(_cuda_ext, "extension", lambda: devices)
    return devices


def test_launch_stream_launches_on_the_tensors_device_and_restores_torchs(devices):
    with _cuda_ext.launch_stream(on("cuda:1")) as stream:
        assert devices.current == 1 and stream == devices.STREAM_BASE + 1
        devices.launched(stream)
    assert torch.cuda.current_device() == 0
    assert devices.launches == [1]


def test_launch_stream_restores_after_an_error(devices):
    with pytest.raises(RuntimeError, match="launch failed"), _cuda_ext.launch_stream(on("cuda:1")):
        raise RuntimeError("fastalign._C.logprobs_forward failed: launch failed")
    assert torch.cuda.current_device() == 0


def test_launch_stream_on_the_current_device(devices):
    devices.current = 1
    with _cuda_ext.launch_stream(on("cuda:1")) as stream:
        assert devices.current == 1 and stream == devices.STREAM_BASE + 1
    with _cuda_ext.launch_stream(on("cuda")) as stream:  # no index: torch's current device
        assert devices.current == 1 and stream == devices.STREAM_BASE + 1
    assert torch.cuda.current_device() == 1


def test_launch_stream_nests(devices):
    """A launch inside another's block (none does today) still finds its device and gives the outer one back."""
    with _cuda_ext.launch_stream(on("cuda:1")):
        with _cuda_ext.launch_stream(on("cuda:0")) as stream:
            assert devices.current == 0 and stream == devices.STREAM_BASE
        assert devices.current == 1
    assert devices.current == 0


class RecordingPolicyExtension:
    """``fastalign._C`` for the policy launcher, on CPU: its real argument structs, launches that only record
    the device they run on (the loss they leave is 0)."""

    def __init__(self, devices: FakeCudaDevices):
        from fastalign import _C

        self.devices, self.set_device = devices, devices.set_device
        self.PolicyProblem, self.PolicyOptions = _C.PolicyProblem, _C.PolicyOptions

    def policy_loss_forward(self, problem, stats, stream):
        self.devices.launched(stream)

    def policy_loss_backward(self, problem, weights, grad_logp, grad_entropy, stream):
        self.devices.launched(stream)


def test_policy_cuda_launcher_launches_inside_the_guard(monkeypatch, devices):
    """The logprobs and DPO launchers are checked so by their emulated-extension tests; the policy one here."""
    pytest.importorskip("fastalign._C", reason="built with the CUDA extension (nvcc at install)")
    monkeypatch.setattr(_cuda_ext, "extension", devices.extension(RecordingPolicyExtension))
    monkeypatch.setattr(policy, "resolve_backend", lambda *args: "cuda")
    logp = torch.randn(3, 5, requires_grad=True)
    loss, _ = fastalign.policy_loss(logp, logp.detach(), torch.randn(3), torch.ones(3, 5), backend="cuda")
    loss.backward()
    assert devices.launches == [0, 0] and devices.guards == 0 and torch.cuda.current_device() == 0


def two_gpus():
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not two_gpus(), reason="needs two CUDA devices")
def test_cuda_ops_on_another_device_leave_the_current_device_alone():
    """Every CUDA-backend op, forward and backward, on cuda:1 while cuda:0 is current: right results, and
    cuda:0 still current after each."""
    previous = torch.cuda.current_device()
    torch.cuda.set_device(0)
    try:
        device = torch.device("cuda", 1)
        logits = torch.randn(8, 1003, device=device, requires_grad=True)
        targets = torch.randint(0, 1003, (8,), device=device)
        logp = fastalign.logprobs_from_logits(logits, targets, backend="cuda")
        assert torch.cuda.current_device() == 0
        logp.sum().backward()
        assert torch.cuda.current_device() == 0
        expected = fastalign.logprobs_from_logits(logits.detach().cpu(), targets.cpu(), backend="torch")
        torch.testing.assert_close(logp.detach().cpu(), expected, rtol=1e-5, atol=1e-5)

        logp_tokens = -torch.rand(4, 37, device=device)
        policy = functools.partial(fastalign.policy_loss, backend="cuda")
        leaf = logp_tokens.clone().requires_grad_()
        loss, _ = policy(leaf, logp_tokens + 0.1, torch.randn(4, device=device), torch.ones(4, 37, device=device))
        assert torch.cuda.current_device() == 0
        loss.backward()
        assert torch.cuda.current_device() == 0

        leaf = logp_tokens.clone().requires_grad_()
        losses, _, _ = fastalign.dpo_loss_from_token_logps(
            leaf, torch.ones(4, 37, device=device), -torch.rand(4, device=device), backend="cuda"
        )
        assert torch.cuda.current_device() == 0
        losses.sum().backward()
        assert torch.cuda.current_device() == 0
    finally:
        torch.cuda.set_device(previous)
