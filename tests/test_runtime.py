"""Runtime: device and precision choice, seeding, the one-line description."""

from __future__ import annotations

import pytest
import torch

from sdnb import runtime


def test_cpu_machine_picks_cpu_and_fp32():
    dev = runtime.pick_device("auto")
    assert dev.type in ("cuda", "mps", "cpu")
    assert runtime.pick_precision(torch.device("cpu"), "auto") == "no"
    with pytest.raises(ValueError, match="fp16"):
        runtime.pick_precision(torch.device("cpu"), "fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_missing_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        runtime.pick_device("cuda")


def test_seed_everything_reproduces_torch_and_numpy():
    import numpy as np

    runtime.seed_everything(3)
    a = torch.rand(3), np.random.rand(3)
    runtime.seed_everything(3)
    b = torch.rand(3), np.random.rand(3)
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all()


def test_drive_path_outside_colab_is_refused_clearly():
    assert runtime.mount_drive("") is False
    assert runtime.mount_drive("/tmp/mirror") is False
    if not runtime.in_colab():
        with pytest.raises(ValueError, match="sync_dir"):
            runtime.mount_drive("/content/drive/MyDrive/sdnb")


def test_setup_prints_one_line_with_versions(capsys):
    rt = runtime.setup("cpu", "auto", seed=0)
    line = capsys.readouterr().out.strip()
    assert rt.device.type == "cpu" and rt.mixed_precision == "no"
    assert "\n" not in line and f"torch {torch.__version__}" in line and "RAM" in line


@pytest.mark.parametrize("capability, requested, expected", [
    ((7, 5), "auto", "fp16"),  # a T4: bf16 only emulated (is_bf16_supported() says True there)
    ((7, 0), "auto", "fp16"),  # a V100
    ((8, 0), "auto", "bf16"),  # an A100
    ((8, 9), "auto", "bf16"),  # an L4
    ((9, 0), "auto", "bf16"),  # an H100
    (None, "auto", "no"),  # no CUDA GPU
    ((7, 5), "no", "no"),  # an explicit choice is kept
    ((7, 5), "bf16", "bf16"),
    (None, "bf16", "bf16"),
])
def test_auto_precision_never_picks_emulated_bf16(capability, requested, expected):
    assert runtime.choose_precision(capability, requested) == expected


def test_fp16_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="mixed_precision='fp16' needs a GPU"):
        runtime.choose_precision(None, "fp16")
