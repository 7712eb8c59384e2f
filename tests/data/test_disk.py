"""Free space and folder sizes, and the refusal of a write that cannot fit, with its exact message."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from sdnb.data.disk import NotEnoughSpace, ensure_space, folder_size, format_gb, free_bytes

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """shutil.disk_usage reporting 1.03 GB free; records the paths it was asked about."""
    asked: list[Path] = []

    def usage(path):
        asked.append(Path(path))
        return Usage(100 * 10 ** 9, 98 * 10 ** 9, 1_030_000_000)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


def test_ensure_space_refuses_with_the_sizes_in_decimal_gb(tmp_path: Path, disk: list[Path]) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(NotEnoughSpace) as err:
        ensure_space(run_dir, 4_270_000_000, "checkpoint step-000500")
    assert str(err.value) == (f"not enough space in {run_dir}: need 4.27 GB, have 1.03 GB (for checkpoint "
                              "step-000500); free space there, lower keep_checkpoints, or choose another folder")
    assert isinstance(err.value, OSError)  # the Mirror reports it and retries, as any failed copy
    assert ensure_space(run_dir, 1_000_000_000, "final weights") == 1_030_000_000
    assert disk == [tmp_path, tmp_path]  # run_dir does not exist yet: measured at its existing parent


def test_free_bytes_of_a_folder_to_be_created_is_its_disks(tmp_path: Path) -> None:
    assert free_bytes(tmp_path / "a" / "b" / "c") == shutil.disk_usage(tmp_path).free > 0


def test_folder_size_counts_every_file_below(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "ckpt" / "sub" / "optimizer.bin").write_bytes(b"y" * 2500)
    (tmp_path / "ckpt" / "empty").write_bytes(b"")
    assert folder_size(tmp_path / "ckpt") == 3500
    assert folder_size(tmp_path / "ckpt" / "model.safetensors") == 1000
    assert folder_size(tmp_path / "missing") == 0


@pytest.mark.parametrize("n, text", [(19_000_000, "0.019 GB"), (4_273_000_000, "4.27 GB"),
                                     (512_340_000_000, "512.3 GB")])
def test_sizes_read_in_decimal_gb(n: int, text: str) -> None:
    assert format_gb(n) == text
