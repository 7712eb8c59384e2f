"""The shared training loop, on a tiny real AutoencoderKL: resume equivalence, accumulation, NaN guard, processes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdnb.config import ConfigError
from sdnb.train import NonFiniteLossError, Trainer, plot_losses, read_log
from sdnb.train.__main__ import main
from sdnb.train.parts import choose_optimizer
from tests.train.harness import AE, HERE, Patches, logged, max_abs_diff, settings, step_fn, tiny_vae, train


def test_stop_and_resume_gives_the_same_weights_and_log(tmp_path: Path) -> None:
    """20 steps straight == 10 steps, then resume="latest" to 20 (EMA, warm-up, RNG in the step, epochs cross).
    Validation every 3 steps: the first stage also validates at its end, step 10, which the straight run does not;
    a validation that moved the training RNG would make the two runs differ from there."""
    kw = dict(ema=True, ema_decay=0.9, lr_scheduler="constant_with_warmup", warmup_steps=4, validate_every=3)
    evals = []

    def evaluate(models, step):
        evals.append(step)
        torch.randn(3)  # validation draws random numbers: the training RNG must not notice
        x = torch.stack(Patches(4).items)
        return {"mse": F.mse_loss(models["ae"].vae(x).sample, x).item()}

    def fit(run_dir, **more):
        trainer = Trainer(settings(run_dir, **kw, **more))
        model = AE(tiny_vae())
        return trainer.fit({"ae": model}, step_fn, Patches(), evaluate=evaluate), model

    straight, model_a = fit(tmp_path / "a")
    first, _ = fit(tmp_path / "b", max_steps=10)
    resumed, model_b = fit(tmp_path / "b", resume="latest")
    diff = max_abs_diff(model_a, model_b)
    print(f"resume: max abs weight difference {diff:g}")
    assert diff == 0.0  # bitwise on CPU
    final_a = (tmp_path / "a/final/ae/model.safetensors").read_bytes()
    assert final_a == (tmp_path / "b/final/ae/model.safetensors").read_bytes()  # EMA weights too
    assert logged(tmp_path / "a") == logged(tmp_path / "b") and len(logged(tmp_path / "a")) == 10
    val = lambda d: [(r["step"], r["val_mse"]) for r in read_log(d / "log.csv") if "val_mse" in r]
    assert [s for s, _ in val(tmp_path / "a")] == [0, 3, 6, 9, 12, 15, 18, 20]
    assert [v for v in val(tmp_path / "b") if v[0] != 10] == val(tmp_path / "a")  # + the first stage's end, step 10
    assert resumed.step == 20 and straight.losses["loss"] == resumed.losses["loss"]
    assert straight.losses["loss"] < read_log(tmp_path / "a/log.csv")[1]["loss"]  # it learns
    assert plot_losses(tmp_path / "a/log.csv").axes[1].get_title() == "validation"


def test_ctrl_c_saves_an_interrupted_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    calls = []

    def interrupting(models, batch):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 8
        return step_fn(models, batch)

    straight, model_a = train(tmp_path / "a", lr_scheduler="cosine", checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", fn=interrupting, lr_scheduler="cosine", checkpoint_every=0)
    state = json.loads((tmp_path / "b/checkpoints/step-000008/sdnb_state.json").read_text())
    assert state["reason"] == "interrupted" and not (tmp_path / "b/final").exists()
    _, model_b = train(tmp_path / "b", lr_scheduler="cosine", checkpoint_every=0, resume="latest")
    assert max_abs_diff(model_a, model_b) == 0.0
    assert logged(tmp_path / "a") == logged(tmp_path / "b")


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    """Two micro-batches of 1 == one batch of 2 (mean losses); GroupNorm is per sample, so this is exact math."""
    kw = dict(max_steps=3, checkpoint_every=0, optimizer="radam", max_grad_norm=0.5)
    _, big = train(tmp_path / "big", sample_posterior=False, batch_size=2, grad_accum=1, **kw)
    _, acc = train(tmp_path / "acc", sample_posterior=False, batch_size=1, grad_accum=2, **kw)
    rel = max_abs_diff(big, acc) / max(p.abs().max().item() for p in big.parameters())
    print(f"accumulation: max abs weight difference relative to the largest weight {rel:g}")
    assert rel < 1e-6


def test_bf16_autocast_keeps_fp32_weights_and_time_based_checkpoints(tmp_path: Path) -> None:
    result, model = train(tmp_path, mixed_precision="bf16", max_steps=4, checkpoint_every=0,
                          checkpoint_minutes=1e-6, keep_checkpoints=10)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and result.losses["loss"] < 1
    assert max_abs_diff(model, AE(tiny_vae())) > 0  # it trained
    reasons = [json.loads(p.read_text())["reason"] for p in sorted(tmp_path.glob("checkpoints/*/sdnb_state.json"))]
    assert reasons == ["time", "time", "time", "final"]  # every step here: the timer is 60 microseconds


def test_nonfinite_losses_are_skipped_and_counted(tmp_path: Path) -> None:
    calls = []

    def sometimes_nan(models, batch):
        calls.append(1)
        out = step_fn(models, batch)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) in (3, 4, 9) else out

    result, model = train(tmp_path, fn=sometimes_nan, max_steps=12)
    assert result.step == 12 and all(torch.isfinite(p).all() for p in model.parameters())
    rows = read_log(tmp_path / "log.csv")
    assert rows[-1]["skipped_nonfinite"] == 3 and all(r["loss"] == r["loss"] for r in rows if "loss" in r)


def test_always_nonfinite_stops_with_the_causes_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    calls = []

    def nan_from_step_7(models, batch):
        calls.append(1)
        out = step_fn(models, batch)
        return {**out, "loss": out["loss"] / 0 * 0} if len(calls) > 6 else out

    with pytest.raises(NonFiniteLossError, match="fp16.*bf16.*learning rate too high.*step-000005"):
        train(tmp_path, fn=nan_from_step_7, nan_patience=4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]
    assert read_log(tmp_path / "log.csv")[-1]["skipped_nonfinite"] == 4


def test_epoch_budget_custom_batches_and_per_model_lr(tmp_path: Path) -> None:
    """max_epochs stops first; batch_sampler_fn gives the batches (set_epoch is called); lrs={"head": 0}."""
    class Recorded(Patches):
        epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    head = nn.Linear(3, 3)
    frozen_by_lr = {k: v.clone() for k, v in head.state_dict().items()}

    def two_models(models, batch):
        out = step_fn(models, batch)
        extra = models["head"](batch["x"].mean(dim=(2, 3))).pow(2).mean()
        return {**out, "loss": out["loss"] + 1e-3 * extra}

    buckets = lambda epoch: [[i, i + 1] for i in range(0, 10, 2)]  # 5 micro-batches per epoch
    trainer = Trainer(settings(tmp_path, max_steps=100, max_epochs=2, checkpoint_every=0, log_every=3))
    dataset, model = Recorded(), AE(tiny_vae())
    result = trainer.fit({"ae": model, "head": head}, two_models, dataset, batch_sampler_fn=buckets,
                         lrs={"head": 0.0})
    assert result.step == 10 and dataset.epochs == [0, 1] and result.history[-1]["epoch"] == 2.0
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in frozen_by_lr.items())
    assert {p.name for p in (tmp_path / "final").iterdir()} == {"ae", "head"}


def test_refuses_to_overwrite_a_run_and_rejects_bad_settings(tmp_path: Path) -> None:
    train(tmp_path, max_steps=5)
    with pytest.raises(FileExistsError, match="resume='latest'"):
        train(tmp_path, max_steps=5)
    with pytest.raises(ValueError, match="mixed_precision"):
        settings(tmp_path, mixed_precision="fp8")
    with pytest.raises(ValueError, match="max_steps"):
        settings(tmp_path, max_steps=0)
    with pytest.raises(ConfigError, match="adam_betas"):
        settings(tmp_path, adam_betas=[0.9, 1.5])
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="optimizer='adamw8bit' needs bitsandbytes"):
            train(tmp_path / "8bit", optimizer="adamw8bit")


def test_entry_point_dispatches_on_stage(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"stage": "gan", "run_dir": str(tmp_path)}))
    with pytest.raises(SystemExit, match="unknown stage 'gan'"):
        main([str(tmp_path / "config.json")])


def test_two_processes_share_the_data_and_end_with_the_same_weights(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo), batch 1 each == one process accumulating 2 micro-batches of 1."""
    args = dict(run_dir=str(tmp_path / "ddp"), batch_size=1, max_steps=4, checkpoint_every=2, log_every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(HERE / "harness.py"), json.dumps(args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"ddp/seen_{r}.json").read_text()) for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 4
    w0, w1 = (torch.load(tmp_path / f"ddp/weights_{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    _, single = train(tmp_path / "single", sample_posterior=False, batch_size=1, grad_accum=2, max_steps=4,
                      checkpoint_every=0)
    diff = max((single.state_dict()[k] - w0[k]).abs().max().item() for k in w0)
    print(f"2 processes vs 1 process accumulating: max abs weight difference {diff:g}")
    assert diff < 1e-5
    assert json.loads((tmp_path / "ddp/checkpoints/step-000004/sdnb_state.json").read_text())["num_processes"] == 2


def test_auto_optimizer_says_what_it_picked_and_how_to_get_8bit(tmp_path: Path, capsys, monkeypatch) -> None:
    train(tmp_path, optimizer="auto", max_steps=2)
    assert "optimizer='auto' -> AdamW: 8-bit AdamW (bitsandbytes) needs a CUDA GPU" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a Colab GPU runtime without the colab extra
    name, why = choose_optimizer("auto", torch.device("cuda"))
    assert name == "adamw" and "bitsandbytes is not installed" in why and 'pip install "sdnb[colab]"' in why
    assert choose_optimizer("radam", torch.device("cuda")) == ("radam", "")
