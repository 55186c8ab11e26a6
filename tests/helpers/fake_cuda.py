"""The calling thread's current CUDA device, emulated on a machine without one, for the host side of the CUDA
backend (``fastalign.ops._cuda_ext.launch_stream``).

torch and ``fastalign._C`` link separate CUDA runtimes that act on one thing, the thread's current CUDA context:
a device the extension makes current (``_C.set_device``) is what ``torch.cuda.current_device()`` reports next.
:class:`FakeCudaDevices` holds that one current device and stands in for both sides: torch's device calls
(``current_device``, the ``_exchange_device`` pair under ``torch.cuda.device``'s guard, ``current_stream``),
and ``set_device`` for the emulated extension. torch's own ``torch.cuda.device`` class runs unchanged on top.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


class FakeCudaDevices:
    """``count`` devices, ``current`` the current one; ``launches`` records the current device at each launch,
    ``guards`` how many ``torch.cuda.device`` blocks are open."""

    STREAM_BASE = 0x5000  # the stream handle of device d is STREAM_BASE + d

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 2, current: int = 0):
        self.count, self.current = count, current
        self.launches: list[int] = []
        self.guards = 0
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "_exchange_device", self._enter_guard)
        monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", self._exit_guard)
        monkeypatch.setattr(torch.cuda, "current_stream", self._current_stream)

    def _index(self, device: object) -> int:
        index = self.current if device is None else torch.cuda._get_device_index(device, optional=True)
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def _exchange(self, device: int) -> int:
        """torch's ``_exchange_device``: make ``device`` current, return the previous one (-1: no-op)."""
        if device < 0:
            return -1
        previous, self.current = self.current, self._index(device)
        return previous

    def _enter_guard(self, device: int) -> int:
        self.guards += 1
        return self._exchange(device)

    def _exit_guard(self, device: int) -> int:
        self.guards -= 1
        return self._exchange(device)

    def _current_stream(self, device: object = None) -> SimpleNamespace:
        return SimpleNamespace(cuda_stream=self.STREAM_BASE + self._index(device))

    def set_device(self, device: int) -> None:
        """``fastalign._C.set_device``: makes ``device`` current for the thread, and does not restore it."""
        self.current = self._index(device)

    def launched(self, stream: int) -> None:
        """Called by an emulated launch: inside torch's device guard, on torch's stream of the current device."""
        assert self.guards > 0, "a launch outside torch's device guard (torch.cuda.device) leaves its device current"
        assert stream == self.STREAM_BASE + self.current, f"stream {stream:#x} is not device {self.current}'s"
        self.launches.append(self.current)

    def extension(self, fake: type) -> object:
        """``_cuda_ext.extension`` returning an instance of the emulated extension ``fake`` that sets devices here
        and reports its launches (``fake(devices=...)``)."""
        instance = fake(devices=self)
        return lambda: instance
