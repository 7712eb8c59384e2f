"""The loop's other guards of issue 11: NaN gradients and weights, exploding losses, settings a resume may or may not
change (fp16 after bf16 included), folders that cannot hold a mirror, and the memory a finished fit gives back."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdnb.config import ConfigError
from sdnb.data.files import MARKER
from sdnb.data.folders import FolderError
from sdnb.train import NonFiniteLossError, Trainer, TrainConfig, loop, read_log
from sdnb.train.checkpoint import list_checkpoints, prune
from sdnb.train.manifest import write_manifest
from sdnb.train.resume_check import ConfigChangeError
from tests.train.harness import AE, Patches, settings, step_fn, tiny_vae, train


def test_nan_gradients_with_clipping_off_are_skipped_and_never_saved(tmp_path: Path) -> None:
    calls = []

    def nan_gradients(models, batch):  # a finite loss whose gradients are NaN: d sqrt(u)/du at 0 is inf, times 0
        calls.append(1)
        out = step_fn(models, batch)
        if len(calls) in (3, 4):
            recon, _ = models["ae"](batch["x"])
            out = {**out, "loss": out["loss"] + torch.sqrt(recon.sum() * 0)}
        return out

    result, model = train(tmp_path, fn=nan_gradients, max_grad_norm=0.0, max_steps=10)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert read_log(tmp_path / "log.csv")[-1]["skipped_nonfinite"] == 2 and result.step == 10
    saved = load_file(tmp_path / "checkpoints/step-000005/model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_nan_weights_are_never_saved_as_the_last_good_checkpoint(tmp_path: Path) -> None:
    calls = []

    def poisoning(models, batch):  # step 10's loss is finite, then a weight turns NaN (as NaN gradients applied would)
        calls.append(1)
        out = step_fn(models, batch)
        if len(calls) == 10:
            with torch.no_grad():
                dict(models["ae"].named_parameters())["vae.encoder.conv_in.bias"].fill_(float("nan"))
        return out

    with pytest.raises(NonFiniteLossError) as err:
        train(tmp_path, fn=poisoning, max_steps=20)
    assert str(err.value).startswith("not saving a checkpoint at step 10: the weights hold NaN or inf "
                                     "(ae.vae.encoder.conv_in.bias). The last good checkpoint is ")
    assert f"The last good checkpoint is {tmp_path}/checkpoints/step-000005: resume from it" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005"]


def test_an_exploding_loss_is_called_out_and_lr_beyond_anything_used_is_refused(tmp_path: Path, capsys) -> None:
    calls = []

    def exploding(models, batch):  # the loss of lr=1 on this model: 0.2 -> 45,217
        calls.append(1)
        out = step_fn(models, batch)
        return {**out, "loss": out["loss"] * (1e5 if len(calls) > 10 else 1)}

    train(tmp_path, fn=exploding, max_steps=14)
    out = capsys.readouterr().out
    assert "WARNING: the loss exploded: " in out and " at step 12, " in out
    assert "The learning rate is probably too high (lr=0.002): stop, lower lr" in out
    assert out.count("the loss exploded") == 1 and "the loss exploded" in (tmp_path / "history.log").read_text()
    with pytest.raises(ConfigError, match=r"^lr=1 is not accepted: expected a number > 0, <= 0.01 \(learning rate"):
        settings(tmp_path, lr=1)


def test_a_resume_refuses_settings_that_break_the_run_and_records_those_it_may_change(tmp_path: Path,
                                                                                       capsys) -> None:
    train(tmp_path, max_steps=10)
    before = (tmp_path / "log.csv").read_text()
    with pytest.raises(ConfigChangeError) as err:
        train(tmp_path, max_steps=20, resume="latest", batch_size=4, seed=1, optimizer="radam")
    assert str(err.value) == (
        f"{tmp_path}/checkpoints/step-000010 was trained with other settings, which a resumed run cannot change:\n"
        f"  batch_size: 2 in {tmp_path}/checkpoints/step-000010, now 4\n"
        f"  optimizer: 'adamw' in {tmp_path}/checkpoints/step-000010, now 'radam'\n"
        f"  seed: 0 in {tmp_path}/checkpoints/step-000010, now 1\n"
        "start a new run_dir, or set these back to the saved values")
    assert (tmp_path / "log.csv").read_text() == before and not list(tmp_path.glob("checkpoints/abandoned-*"))
    result, _ = train(tmp_path, max_steps=12, resume="latest", lr=1e-3, log_every=1)
    assert result.step == 12
    assert "changed for this stage: log_every 2 -> 1, lr 0.002 -> 0.001, max_steps 10 -> 12" in \
        (tmp_path / "history.log").read_text()


def test_fp16_continues_a_checkpoint_saved_without_a_loss_scaler(tmp_path: Path, monkeypatch, capsys) -> None:
    """bf16 on one GPU, then a T4 with fp16: accelerate would look for scaler.pt. A GradScaler stands in on CPU."""
    train(tmp_path, max_steps=5)
    real = loop.make_accelerator

    def with_scaler(s):
        accelerator = real(s)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # what mixed_precision="fp16" makes
        return accelerator

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    result, model = train(tmp_path, max_steps=10, resume="latest")
    assert "step-000005 was saved without fp16's loss scaler (trained in bf16 or fp32): fp16 continues with a fresh " \
           "one (scale 256)" in capsys.readouterr().out
    assert result.step == 10 and (tmp_path / "checkpoints/step-000010/scaler.pt").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fit_gives_back_the_optimizer_and_gradients_without_the_garbage_collector(tmp_path: Path,
                                                                                monkeypatch) -> None:
    made = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    trainer, model = Trainer(settings(tmp_path, max_steps=3)), AE(tiny_vae())
    gc.disable()
    try:
        trainer.fit({"ae": model}, step_fn, Patches())
        optimizer = weakref.ref(made.pop())
        assert optimizer() is None  # freed when fit returned, while the Trainer and the model live on
        assert all(p.grad is None for p in model.parameters())
        assert not trainer.accelerator._optimizers and not trainer.accelerator._save_model_state_pre_hook
    finally:
        gc.enable()


def test_a_sync_dir_that_is_a_file_or_whose_drive_vanished_is_refused(tmp_path: Path) -> None:
    (tmp_path / "drive").write_text("not a folder")
    with pytest.raises(FolderError, match=f"^sync_dir='{tmp_path}/drive' is a file, not a folder: choose another "
                                          "sync_dir or move that file away$"):
        train(tmp_path / "a", sync_dir=str(tmp_path / "drive"))
    with pytest.raises(FolderError, match=f"its parent folder {tmp_path}/backup/sdnb does not exist \\(was a disk "
                                          "unmounted\\?\\)"):
        train(tmp_path / "b", sync_dir=str(tmp_path / "backup/sdnb/run"))
    with pytest.raises(FolderError, match=f"is on Google Drive, but Drive is not mounted at {tmp_path}/gdrive "
                                          f"\\({tmp_path}/gdrive/MyDrive is missing: after an unmount or a runtime reset"):
        train(tmp_path / "c", sync_dir=str(tmp_path / "gdrive/MyDrive/sdnb/run"))
    assert not (tmp_path / "backup").exists() and not (tmp_path / "gdrive").exists()  # nothing on the local disk


def test_the_config_cell_refuses_a_misspelt_resume_and_keeps_an_earlier_runs_config(tmp_path: Path,
                                                                                    capsys) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(run_dir=str(tmp_path), resume="lastest")
    assert str(err.value) == (
        "resume='lastest' is not accepted: expected '' (a new run), 'latest' (the newest checkpoint in run_dir or "
        f"sync_dir) or a checkpoint folder such as {tmp_path}/checkpoints/step-000500; no folder 'lastest' exists")
    with pytest.raises(ConfigError, match=f"^sync_dir='{tmp_path}/drive' is not accepted: it is, contains or lies "
                                          f"inside run_dir='{tmp_path}'; the mirror must be another folder"):
        TrainConfig(run_dir=str(tmp_path), sync_dir=str(tmp_path / "drive"))
    first = TrainConfig(run_dir=str(tmp_path), max_steps=10)
    assert first.save() == tmp_path / "config.json"
    second = TrainConfig(run_dir=str(tmp_path), max_steps=20, resume="latest")
    assert second.save() == tmp_path / "config.pending.json"
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 10  # until training accepts it
    assert "holds the earlier run's config; this one is in" in capsys.readouterr().out


def test_pruning_never_deletes_the_newest_checkpoint_that_verifies(tmp_path: Path, capsys) -> None:
    for step in (5, 10, 15):
        folder = tmp_path / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 100)
        write_manifest(folder)
        (folder / MARKER).write_text(f"{step}\n")
    for step in (10, 15):  # both newer copies damaged after they were written
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "model.safetensors").write_bytes(b"w" * 50)
    prune(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-000010", "step-000015"]
    assert f"keeping {tmp_path}/checkpoints/step-000005: the newer checkpoints in" in capsys.readouterr().out


def test_the_02_config_cell_refuses_an_epoch_without_a_batch_and_held_out_images_among_the_training_ones(
        tmp_path: Path) -> None:
    from sdnb.vae import VAEConfig

    with pytest.raises(ConfigError) as err:
        VAEConfig(patches_per_epoch=4, batch_size=8)
    assert str(err.value) == ("patches_per_epoch=4 is not accepted with batch_size=8: an epoch would hold no full "
                              "batch; set patches_per_epoch >= batch_size")
    train_dir = tmp_path / "fundus" / "train"
    (train_dir / "val").mkdir(parents=True)
    (tmp_path / "link").symlink_to(train_dir)
    for val in (train_dir, train_dir / "val", tmp_path / "fundus", tmp_path / "link"):
        with pytest.raises(ConfigError) as err:
            VAEConfig(image_dir=str(train_dir), val_image_dir=str(val))
        assert str(err.value) == (f"val_image_dir={str(val)!r} is not accepted: it is, contains or lies inside "
                                  f"image_dir={str(train_dir)!r}, so the held-out metrics would be measured on training "
                                  "images; choose a separate folder, or val_image_dir='' to hold out val_fraction of "
                                  "image_dir by image")
    assert VAEConfig(image_dir=str(train_dir), val_image_dir=str(tmp_path / "fundus" / "test")).val_image_dir
