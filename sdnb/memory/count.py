"""Counting a training step's memory on fake tensors: `LiveBytes` follows every storage the step allocates and
frees, `step_peak` runs one forward (autocast in half precision) and backward under it, `optimizer_bytes` counts
what the optimizer keeps and needs to step."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages the ops run under it allocate, while they live: `live` now, `peak` so far.

    A storage is counted once however many views share it; storages made before (parameters, inputs) are not
    counted, nor their views. Keeps `events` (storage key, +bytes or -bytes) so that a peak can be taken
    afterwards without some storages."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, tuple[int, int]] = {}  # live storage key -> (allocation number, bytes)
        self.events: list[tuple[int, int]] = []  # (allocation number, +bytes or -bytes)
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):  # a view or an in-place op returns an input's storage: nothing new
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the StorageImpl, shared by every view; its address is reused once it is freed
        if key in self.sizes:
            return
        self.sizes[key] = number, size = len(self.events), storage.nbytes()
        self.events.append((number, size))
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        number, size = self.sizes.pop(key, (-1, 0))
        self.events.append((number, -size))
        self.live -= size

    def allocation(self, tensor: Tensor) -> int:
        """The allocation number of a live tensor's storage (-1: not allocated under this counter)."""
        return self.sizes.get(tensor.untyped_storage()._cdata, (-1, 0))[0]

    def peak_without(self, numbers: set[int]) -> int:
        """The peak of the live bytes, leaving out the allocations `numbers` (e.g. the gradients')."""
        live = peak = 0
        for number, size in self.events:
            if number not in numbers:
                live += size
                peak = max(peak, live)
        return peak


def fake_tensors() -> FakeTensorMode:
    """The mode a plan's step runs in: tensors with shapes and dtypes, and no memory."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(mode: FakeTensorMode, *modules: nn.Module) -> None:
    """Turn the meta-device parameters and buffers of `modules` (built under `torch.device("meta")`, where `Module.to`
    and LoRA adapters work as on a real device) into fake CPU tensors of the same shapes and dtypes."""
    fake = lambda t: mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu"))  # noqa: E731
    for module in modules:
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    sub._parameters[name] = nn.Parameter(fake(p.detach()), requires_grad=p.requires_grad)
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = fake(b)


def step_peak(step: Callable[[], Tensor], trainable: Iterable[Tensor], precision: str) -> tuple[int, int]:
    """(peak, peak apart from the gradients): bytes allocated during `step()`'s forward (under autocast when
    `precision` is 'fp16' or 'bf16') and the backward of the loss it returns. Run it on fake tensors."""
    trainable = list(trainable)
    with LiveBytes() as live:
        with torch.autocast("cpu", dtype=HALF.get(precision, torch.float32), enabled=precision in HALF):
            loss = step()
        loss.backward()
        del loss
        grads = {live.allocation(p.grad) for p in trainable if p.grad is not None}
        result = live.peak, live.peak_without(grads)
    for p in trainable:
        p.grad = None
    return result


def optimizer_bytes(optimizer: str, params: Iterable[Tensor]) -> tuple[int, int]:
    """(state, transient of a step) in bytes for `optimizer` over `params` (fp32 master weights).

    AdamW and RAdam keep two fp32 moments (8 bytes a parameter); on a GPU torch steps them with foreach ops, whose
    `_foreach_sqrt` of the second moment is a full fp32 copy for the duration of the step (RAdam: one more, the
    bias-corrected first moment). bitsandbytes' AdamW8bit keeps the moments in 8 bits with an fp32 scale per block
    of 256 for tensors of 4096 elements or more (`min_8bit_size`), in fp32 below that, and steps in place.
    """
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    if optimizer == "adamw8bit":
        return sum(2 * (k + 4 * -(-k // 256)) if k >= 4096 else 8 * k for k in sizes), 0
    return 8 * n, (8 if optimizer == "radam" else 4) * n
