"""Watching what aten ops allocate: the proof that no [N, V] tensor appears."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationWatcher(TorchDispatchMode):
    """Record the shape and size of every tensor returned by an aten op."""

    def __init__(self):
        super().__init__()
        self.produced: list[tuple[tuple[int, ...], int]] = []
        # Shapes of the outputs whose storage is new (not a view of, or written into, an input): allocations.
        self.allocated: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.produced.append((tuple(tensor.shape), tensor.numel() * tensor.element_size()))
                if tensor.untyped_storage().data_ptr() not in inputs:
                    self.allocated.append(tuple(tensor.shape))
        return out
