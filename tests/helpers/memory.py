"""Watching what aten ops allocate: the proof that no [N, V] tensor appears."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationWatcher(TorchDispatchMode):
    """Record the shape and size of every tensor returned by an aten op."""

    def __init__(self):
        super().__init__()
        self.produced: list[tuple[tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.produced.append((tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return out
