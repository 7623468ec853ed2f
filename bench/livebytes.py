"""Peak bytes of live tensors on any device: a CPU stand-in for ``torch.cuda.max_memory_allocated``.

Every tensor an op returns inside the mode is tracked by the storage it owns: a storage counts from the op that
created it until the last tensor viewing it is freed. Storages that existed before the mode (weights, inputs) and
ops that return one of them (in-place ops, views of inputs) are not counted, so ``peak`` is the high-water mark of
the memory a computation allocated, in bytes.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._views: dict[int, int] = {}     # storage address -> tensors alive that use it
        self._nbytes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or (ptr in inputs and ptr not in self._views):
            return
        if ptr not in self._views:
            self._views[ptr], self._nbytes[ptr] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._views[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self._views[ptr] -= 1
        if self._views[ptr] == 0:
            del self._views[ptr]
            self.live -= self._nbytes.pop(ptr)
