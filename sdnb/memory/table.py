"""Memory plans: the table of what a run needs on a device (`Usage`), whether it fits (`Plan`), and the first change
that makes it fit (`suggest`: gradient checkpointing, 8-bit AdamW, LoRA, smaller batches, lower resolution)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sdnb.memory.count import optimizer_bytes
from sdnb.runtime import choose_precision
from sdnb.train.parts import INSTALL_8BIT, resolve_optimizer

GiB = 2 ** 30
CUDA_RESERVED = int(0.4 * GiB)  # the CUDA context and cuBLAS/cuDNN workspaces, outside torch's own allocations
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation: plan to use 95% of what is left
T4_BYTES = 15_835_660_288  # `torch.cuda.get_device_properties(0).total_memory` of Colab's "16 GB" Tesla T4
OPTIMIZER_NAMES = {"adamw": "AdamW", "radam": "RAdam", "adamw8bit": "8-bit AdamW"}


@dataclass(frozen=True)
class Choices:
    """What a run's memory depends on; `precision` and `optimizer` as resolved for the target device."""

    batch_size: int
    grad_accum: int
    resolution: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    lora_rank: int = 0
    ema: bool = False

    def describe(self) -> str:
        precision = {"no": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}.get(self.precision, self.precision)
        parts = [f"{self.resolution} px", f"batch {self.batch_size} x grad_accum {self.grad_accum}", precision,
                 OPTIMIZER_NAMES.get(self.optimizer, self.optimizer),
                 "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"]
        return ", ".join(parts + ([f"LoRA rank {self.lora_rank}"] if self.lora_rank else []) + (["EMA"] if self.ema else []))


@dataclass(frozen=True)
class Usage:
    """Bytes on the device, by what holds them."""

    weights: int  # trained parameters, fp32 master weights
    gradients: int
    optimizer: int
    ema: int
    frozen: int  # frozen models and frozen base weights (half precision on a GPU)
    activations: int  # the step's peak beyond the gradients: saved activations, half weight copies, transients

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.frozen + self.activations

    ROWS = (("weights", "weights (trained, fp32)"), ("gradients", "gradients"), ("optimizer", "optimizer state"),
            ("ema", "EMA weights"), ("frozen", "frozen weights"), ("activations", "activations (step peak)"))


Measure = Callable[[Choices], tuple[list[Tensor], list[Tensor], int, int]]


def usage(choices: Choices, trainable: list[Tensor], frozen: list[Tensor], peak: int, peak_no_grads: int) -> Usage:
    """The `Usage` of a run from its parameters and one measured step (`step_peak`): with several micro-batches the
    gradients live through the next forward; the optimizer step needs the gradients plus its transient."""
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    grads = sum(4 * p.numel() for p in trainable)
    state, transient = optimizer_bytes(choices.optimizer, trainable)
    if choices.grad_accum > 1:
        peak = max(peak, grads + peak_no_grads)
    return Usage(weights=nbytes(trainable), gradients=grads, optimizer=state,
                 ema=4 * sum(p.numel() for p in trainable) if choices.ema else 0, frozen=nbytes(frozen),
                 activations=max(peak, grads + transient) - grads)


@dataclass(frozen=True)
class Target:
    """A device to plan for: its name, the bytes a run may use there, and its compute capability (None: no GPU)."""

    name: str
    usable: int
    capability: tuple[int, int] | None

    @classmethod
    def t4(cls) -> "Target":
        return cls("a 16 GB Tesla T4 (Colab)", int((T4_BYTES - CUDA_RESERVED) * (1 - ALLOCATOR_SLACK)), (7, 5))


def targets(device: torch.device) -> list[Target]:
    """The device found (a CUDA GPU: its free memory now; else the free RAM) and, when it is no CUDA GPU, a T4
    (the meta device: the T4 only)."""
    if device.type == "meta":
        return [Target.t4()]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return [Target(name, int(free * (1 - ALLOCATOR_SLACK)), torch.cuda.get_device_capability(device))]
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:  # psutil is optional
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return [Target(f"this {device.type.upper()} ({free / GiB:.1f} GiB RAM free)", free, None), Target.t4()]


def resolve(choices: Choices, target: Target, requested_precision: str, requested_optimizer: str) -> Choices:
    """`choices` with precision and optimizer as the run would resolve them on `target`."""
    device = torch.device("cuda" if target.capability else "cpu")
    return replace(choices, precision=choose_precision(target.capability, requested_precision),
                   optimizer=resolve_optimizer(requested_optimizer, device))


class Plans(list):
    """The plans `plan` makes, one per target; printed as their tables."""

    def __str__(self) -> str:
        return "\n".join(map(str, self))


@dataclass(frozen=True)
class Plan:
    """A run's memory on one target: as set, and (when it does not fit) the first change found that fits."""

    title: str
    target: Target
    choices: Choices
    usage: Usage
    fix: tuple[str, Choices, Usage] | None = None  # (the change, in parameter names; choices; usage)

    @property
    def fits(self) -> bool:
        return self.usage.total <= self.target.usable

    def __str__(self) -> str:
        cols = [("as set", self.usage)] + ([("fits with the change", self.fix[2])] if self.fix else [])
        lines = [f"Memory plan, {self.title}, on {self.target.name}: {self.choices.describe()}",
                 f"  {'':26}" + "".join(f"{name:>22}" for name, _ in cols)]
        for key, label in Usage.ROWS:
            lines.append(f"  {label:26}" + "".join(f"{getattr(u, key) / GiB:18.2f} GiB" for _, u in cols))
        lines.append(f"  {'total':26}" + "".join(f"{u.total / GiB:18.2f} GiB" for _, u in cols))
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {self.target.usable / GiB:.2f} GiB usable -> {verdict}")
        if self.fix:
            lines.append(f"  fits with: {self.fix[0]}\n  that is: {self.fix[1].describe()}")
        elif not self.fits:
            lines.append("  no change tried fits (gradient checkpointing, 8-bit AdamW, LoRA, batch 1, 256 px)")
        return "\n".join(lines)


Change = tuple[str, Callable[[Choices], Choices]]


def changes(choices: Choices, lora_rank: int = 0) -> list[Change]:
    """What to try, in order, to make a run fit: gradient checkpointing, 8-bit AdamW, LoRA (when the stage has it),
    a smaller micro-batch with more accumulation (same effective batch), a lower resolution."""
    found: list[Change] = [("gradient_checkpointing=True", lambda c: replace(c, gradient_checkpointing=True)),
                           (f"optimizer='adamw8bit' ({INSTALL_8BIT})", lambda c: replace(c, optimizer="adamw8bit"))]
    if lora_rank:
        found.append((f"lora_rank={lora_rank}", lambda c: replace(c, lora_rank=lora_rank)))
    effective, batch = choices.batch_size * choices.grad_accum, choices.batch_size
    while batch > 1:
        batch, accum = batch // 2, -(-effective // (batch // 2))
        found.append((f"batch_size={batch}, grad_accum={accum}",
                      lambda c, b=batch, a=accum: replace(c, batch_size=b, grad_accum=a)))
    resolution = choices.resolution
    while resolution * 3 // 4 // 64 * 64 >= 256:
        resolution = resolution * 3 // 4 // 64 * 64
        found.append((f"resolution={resolution}", lambda c, r=resolution: replace(c, resolution=r)))
    return found


def suggest(total: Callable[[Choices], int], choices: Choices, usable: int, options: list[Change]) -> list[Change] | None:
    """The changes (cumulative, in order, until the run fits; then those it fits without dropped) or None."""
    def apply(picked: list[Change]) -> Choices:
        c = choices
        for _, fn in picked:
            c = fn(c)
        return c

    picked: list[Change] = []
    for change in options:
        if change[1](apply(picked)) == apply(picked):
            continue
        picked.append(change)
        if total(apply(picked)) <= usable:
            break
    else:
        return None
    for change in list(picked[:-1]):
        fewer = [c for c in picked if c is not change]
        if total(apply(fewer)) <= usable:
            picked = fewer
    return picked


def plan(title: str, measure: Measure, choices: Choices, device: torch.device, requested_precision: str = "auto",
         requested_optimizer: str = "auto", lora_rank: int = 0) -> Plans:
    """The plans of a run for `device` (and a T4 when `device` is no CUDA GPU), each with a fix when it does not
    fit. `measure(choices)` builds the stage's models on fake tensors and measures one step (`step_peak`);
    `lora_rank` > 0 lets the fixes include a LoRA of that rank."""
    memo: dict[Choices, tuple] = {}

    def use(c: Choices) -> Usage:
        key = replace(c, optimizer="adamw", ema=False, grad_accum=1)
        if key not in memo:
            with torch.random.fork_rng(devices=[]):  # building models draws nothing from the run's generators
                memo[key] = measure(key)
        return usage(c, *memo[key])

    plans = Plans()
    for target in targets(device):
        c = resolve(choices, target, requested_precision, requested_optimizer)
        found, fix = use(c), None
        if found.total > target.usable:
            picked = suggest(lambda x: use(x).total, c, target.usable, changes(c, lora_rank))
            if picked:
                fixed = c
                for _, fn in picked:
                    fixed = fn(fixed)
                fix = (", ".join(label for label, _ in picked), fixed, use(fixed))
        plans.append(Plan(title, target, c, found, fix))
    return plans
