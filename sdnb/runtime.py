"""Where the notebook runs: Colab or not, Google Drive, device, precision (and the dtype of frozen weights),
seeding."""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate.utils import set_seed

from sdnb import __version__

DRIVE_ROOT = "/content/drive"


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def mount_drive(sync_dir: str) -> bool:
    """Mount Google Drive when `sync_dir` lies under /content/drive on Colab; return True if mounted.

    Outside Colab a Drive path is refused with a clear message, since nothing would be synced.
    """
    if not sync_dir or not str(sync_dir).startswith(DRIVE_ROOT):
        return False
    if not in_colab():
        raise ValueError(
            f"sync_dir={sync_dir!r} is a Google Drive path, but this is not a Colab runtime: "
            "set sync_dir to a local folder, or '' to turn syncing off"
        )
    if not Path(DRIVE_ROOT, "MyDrive").exists():
        from google.colab import drive  # only importable on Colab

        drive.mount(DRIVE_ROOT)
    return True


def pick_device(device: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice that is not available fails clearly."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but no CUDA GPU is visible (on Colab: Runtime > Change runtime type > GPU)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps', but this machine has no Apple GPU")
    return torch.device(device)


def choose_precision(capability: tuple[int, int] | None, requested: str = "auto") -> str:
    """Accelerate's mixed-precision name for a CUDA GPU of compute `capability` (None: no CUDA GPU).

    'auto': bf16 only where the GPU has bf16 hardware (compute capability 8.0, Ampere, and newer), fp16 autocast with
    a gradient scaler on older GPUs (a T4 is 7.5: `torch.cuda.is_bf16_supported()` says True there, as it counts
    emulation, which is slow), 'no' without a CUDA GPU. Master weights stay fp32 in every case; only the forward
    and backward run in half precision.
    """
    if requested != "auto":
        if requested == "fp16" and capability is None:
            raise ValueError("mixed_precision='fp16' needs a GPU; use 'no' or 'bf16' on CPU")
        return requested
    if capability is None:
        return "no"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def pick_precision(device: torch.device, mixed_precision: str = "auto") -> str:
    """`choose_precision` for `device` ('auto' gives 'no' on CPU and MPS); an explicit bf16 on a GPU without bf16
    hardware is kept, with a warning that it is emulated."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if mixed_precision == "bf16" and capability is not None and tuple(capability) < (8, 0):
        warnings.warn(f"mixed_precision='bf16' on a GPU of compute capability {capability[0]}.{capability[1]}: it has no "
                      "bf16 hardware, so bf16 is emulated and slow; 'auto' picks fp16 autocast there", stacklevel=2)
    return choose_precision(capability, mixed_precision)


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weights_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of weights used only for inference (frozen models, pipelines, BLIP): the half precision that
    `precision` names ("fp16", "bf16"; "auto" as `pick_precision` resolves it) on a GPU, fp32 otherwise."""
    device = torch.device(device)
    if precision == "auto":
        precision = pick_precision(device, "auto")
    if precision not in ("no", "fp32", *HALF_DTYPES):
        raise ValueError(f"precision={precision!r}: expected 'auto', 'no', 'fp32', 'fp16' or 'bf16'")
    return HALF_DTYPES.get(precision, torch.float32) if device.type == "cuda" else torch.float32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    set_seed(seed)


def _memory_gb() -> float:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def describe(device: torch.device | None = None) -> str:
    """One line: versions, device and memory."""
    device = device or pick_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"cuda ({props.name}, {props.total_memory / 2**30:.1f} GB)"
    else:
        dev = f"{device.type} ({os.cpu_count()} cores)"
    return (
        f"sdnb {__version__} | Python {platform.python_version()} | torch {torch.__version__} | "
        f"diffusers {diffusers.__version__} | transformers {transformers.__version__} | "
        f"device {dev} | RAM {_memory_gb():.1f} GB | {'Colab' if in_colab() else 'local'}"
    )


@dataclass(frozen=True)
class Runtime:
    """What a notebook runs on."""

    device: torch.device
    mixed_precision: str
    colab: bool
    drive_mounted: bool


def setup(device: str = "auto", mixed_precision: str = "auto", seed: int = 0, sync_dir: str = "") -> Runtime:
    """Pick device and precision, seed everything, mount Drive if asked, and print one line about it all."""
    dev = pick_device(device)
    precision = pick_precision(dev, mixed_precision)
    seed_everything(seed)
    mounted = mount_drive(sync_dir)
    print(describe(dev) + f" | precision {precision}")
    return Runtime(device=dev, mixed_precision=precision, colab=in_colab(), drive_mounted=mounted)
