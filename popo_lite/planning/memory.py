"""Peak bytes of live tensor storage during a block of code, on any device (CPU included).

`torch.cuda.max_memory_allocated` exists only on a GPU; this tracker counts what the CPU tests need to
check `popo_lite.plan`'s predictions against: every storage that an op dispatched inside the block
returns is counted once (views share it), from its birth until Python frees it (a `weakref.finalize` on
the storage, whose Python object torch keeps alive exactly as long as the storage itself). Tensors that
already exist are added with `watch` (model weights, optimizer state) so that freeing one (a gradient
set to None) lowers the count too.

Not seen: memory allocated and freed inside one op, where the mode is off (bitsandbytes' dequantised NF4
weight in `gemm_4bit`, a GPU matmul workspace), and the CUDA caching allocator's rounding.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as memory: ...` then `memory.peak` (bytes); `memory.current` is live bytes now."""

    def __init__(self, watch: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage identity -> bytes
        self.current = 0
        self.peak = 0
        self.watch(watch)

    def watch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that exist already (each storage once) from now until they are freed."""
        for tensor in tensors:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if key in self.live:
            # An op that resized its output in place (`out=`) grew a storage we already count.
            self._change(key, size - self.live[key])
            return
        self._change(key, size)
        weakref.finalize(storage, self._free, key)

    def _change(self, key: int, delta: int) -> None:
        self.live[key] = self.live.get(key, 0) + delta
        self.current += delta
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            self._add(leaf)
        return output


def quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit weight's quantisation state (absmax, code tables, nested state)."""
    state, found = getattr(param, "quant_state", None), []
    while state is not None:
        found += [t for t in (state.absmax, state.code, state.offset) if torch.is_tensor(t)]
        state = getattr(state, "state2", None)
    return found


def tensors_of(*objects) -> list[torch.Tensor]:
    """Parameters (with any 4-bit quantisation state), buffers and gradients of modules, the state
    tensors of optimizers, and tensors themselves."""
    found: list[torch.Tensor] = []
    for item in objects:
        if isinstance(item, torch.nn.Module):
            params = list(item.parameters())
            found += params + [t for p in params for t in quant_state_tensors(p)] + list(item.buffers())
            found += [p.grad for p in params if p.grad is not None]
        elif isinstance(item, torch.optim.Optimizer):
            found += [t for state in item.state.values() for t in state.values() if torch.is_tensor(t)]
        elif isinstance(item, torch.Tensor):
            found.append(item)
    return found
