"""run_dir and sync_dir creation: never over a file, never a Drive folder on the local disk of a runtime."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdnb.data import folders
from sdnb.data.folders import FolderError, check_run_dir, check_sync_dir, drive_mount_of


@pytest.fixture
def colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for Colab's /content/drive: an empty folder, as after an unmount or a runtime reset."""
    root = tmp_path / "content" / "drive"
    root.mkdir(parents=True)
    monkeypatch.setattr(folders, "DRIVE_ROOTS", (str(root),))
    return root


def test_an_unmounted_drive_is_refused_and_nothing_is_created_on_the_local_disk(colab: Path) -> None:
    target = colab / "MyDrive" / "sdnb" / "02_vae"
    for check, what in [(check_sync_dir, "sync_dir"), (check_run_dir, "run_dir")]:
        with pytest.raises(FolderError) as err:
            check(target)
        assert str(err.value).startswith(f"{what}={str(target)!r} is on Google Drive, but Drive is not mounted "
                                         f"at {colab} ({colab} is not a mount point: ")
        assert f"drive.mount({str(colab)!r})" in str(err.value)
    assert list(colab.iterdir()) == []


def test_a_mounted_drive_gets_the_missing_folders_below_its_top_folder(colab: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (colab / "MyDrive").mkdir()  # what the mount shows
    with pytest.raises(FolderError, match="is not a mount point"):  # MyDrive is there, the mount is not
        check_sync_dir(colab / "MyDrive" / "sdnb" / "run")
    real = os.path.ismount
    monkeypatch.setattr(folders.os.path, "ismount", lambda p: str(p) == str(colab) or real(p))
    assert check_sync_dir(colab / "MyDrive" / "sdnb" / "run").is_dir()  # parents created inside the mount
    assert drive_mount_of(colab / "MyDrive" / "x") == (colab, colab / "MyDrive")


def test_a_drive_mounted_elsewhere_is_recognised_by_its_top_folder(tmp_path: Path) -> None:
    gdrive = tmp_path / "gdrive"  # drive.mount('/gdrive'), now unmounted: an empty folder
    gdrive.mkdir()
    with pytest.raises(FolderError, match=f"not mounted at {gdrive} \\({gdrive}/My Drive is missing: "):
        check_run_dir(gdrive / "My Drive" / "runs" / "a")
    (gdrive / "My Drive").mkdir()
    assert check_run_dir(gdrive / "My Drive" / "runs" / "a").is_dir()
    assert drive_mount_of(tmp_path / "runs") is None


def test_sync_dir_is_created_only_inside_an_existing_folder_and_run_dir_with_its_parents(tmp_path: Path) -> None:
    with pytest.raises(FolderError) as err:
        check_sync_dir(tmp_path / "backup" / "sdnb" / "run")
    assert str(err.value) == (f"sync_dir={str(tmp_path / 'backup/sdnb/run')!r}: its parent folder "
                              f"{tmp_path / 'backup/sdnb'} does not exist (was a disk unmounted?); sync_dir is "
                              "created only inside an existing folder so that its copies never land on a disk that "
                              f"is not the one meant: create {tmp_path / 'backup/sdnb'} first")
    assert not (tmp_path / "backup").exists()
    assert check_sync_dir(tmp_path / "run").is_dir()  # only the last component is missing
    assert check_run_dir(tmp_path / "runs" / "02" / "a").is_dir()


def test_a_file_in_the_way_and_a_dead_mount_give_clear_errors(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FolderError, match=r"sync_dir='.*/f' is a file, not a folder: choose another sync_dir"):
        check_sync_dir(tmp_path / "f")
    with pytest.raises(FolderError, match=r"run_dir='.*/f/run' cannot be created: .*/f is a file, not a folder"):
        check_run_dir(tmp_path / "f" / "run")

    def disconnected(self, *args, **kwargs):
        raise OSError(107, "Transport endpoint is not connected")

    monkeypatch.setattr(Path, "mkdir", disconnected)
    with pytest.raises(FolderError, match=r"cannot be used: \[Errno 107\] Transport endpoint is not connected "
                                          r"\(on Google Drive: remount it"):
        check_run_dir(tmp_path / "new")
