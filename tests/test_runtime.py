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
