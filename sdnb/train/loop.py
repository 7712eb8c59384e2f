"""The one training loop both stages share: `Trainer(config).fit(models, step_fn, dataset)`.

It reads like nanoGPT's train.py: one loop, in a fixed order
    1. learning rate  2. evaluate / sample / checkpoint  3. forward and backward over the micro-batches
    4. clip and step (skipped on every process when a loss is not finite)  5. log
on accelerate, so the same code runs on a CPU, one GPU, or under `accelerate launch` / `torchrun`.
Under several processes the step function must call the models it is given through forward
(`models["unet"](...)`): DistributedDataParallel synchronises gradients only there, so methods such as
`vae.encode` would bypass it; the first step checks that every process holds the same gradients.
Entry point: `python -m sdnb.train run_dir/config.json` (also under `accelerate launch -m sdnb.train`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from diffusers.optimization import get_scheduler
from torch import Tensor, nn
from torch.utils.data import Dataset

from sdnb.data.folders import check_run_dir
from sdnb.train.batches import MicroBatches, shuffled_batches
from sdnb.train.checkpoint import apply_hyperparameters, load_checkpoint, register_portable_weights, save_checkpoint
from sdnb.train.config import TrainConfig
from sdnb.train.logs import LossWindow, RunLog, progress_bar, read_log
from sdnb.train.parts import NonFiniteLossError, TrainResult, check_grads_synced, deferred_interrupt, ema_weights, \
    evaluation_mode, make_accelerator, make_emas, make_optimizer, nonfinite_message, on_main, param_groups, \
    save_pretrained_all
from sdnb.train.guards import after_save, before_save, close_run, write_final
from sdnb.train.resume import lock_run, record, start
from sdnb.train.space import state_bytes
from sdnb.train.sync import Mirror


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


class Trainer:
    """Owns the Accelerator and runs `fit` once: a stage brings models, a dataset and a step function."""

    def __init__(self, settings: TrainConfig, config: Mapping | Any | None = None):
        """`settings`: a `TrainConfig` (or a stage config extending it); `config`: what checkpoints record as the
        run's configuration (default: the settings)."""
        s = self.settings = settings
        self.accelerator = make_accelerator(s)
        self.device = self.accelerator.device
        self.run_dir = Path(s.run_dir)
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            check_run_dir(self.run_dir)  # refused on an unmounted Google Drive, or where a file is
        config = config if config is not None else s
        self.config = asdict(config) if is_dataclass(config) else dict(config)
        self.mirror: Mirror | None = None
        self.locks: list = []
        self._interrupt = self._fitted = False

    # ---------------------------------------------------------------- the loop
    def fit(self, models: dict[str, nn.Module], step_fn: Callable[[dict[str, nn.Module], Any], dict[str, Tensor]],
            dataset: Dataset, *, collate_fn: Callable | None = None,
            batch_sampler_fn: Callable[[int], list[list[int]]] | None = None, lrs: dict[str, float] | None = None,
            evaluate: Callable[[dict[str, nn.Module], int], dict[str, float]] | None = None,
            sample: Callable[[dict[str, nn.Module], int, Path], None] | None = None,
            save_final: Callable[[dict[str, nn.Module], Path], None] | None = None) -> TrainResult:
        """Train `models` with `step_fn(models, batch) -> {"loss": total, ...}` until the step/epoch budget."""
        self.evaluate_fn, self.sample_fn = evaluate, sample
        try:
            self._setup(models, dataset, collate_fn, batch_sampler_fn, lrs or {})
            bar = progress_bar(self.total_steps, self.step, disable=not self.is_main)
            try:
                with deferred_interrupt(lambda: setattr(self, "_interrupt", True)):
                    self._loop(step_fn, bar)
                if self._interrupt:
                    raise KeyboardInterrupt
                final = self._write_final(save_final or save_pretrained_all)
            finally:
                bar.close()
            last = next((r for r in reversed(self.log.rows) if "loss" in r), {})
            return TrainResult(self.step, {k: v for k, v in last.items() if k not in ("step", "epoch")}, final,
                               self.last_checkpoint, read_log(self.run_dir / "log.csv"))
        finally:  # wait for the mirror, release the locks, free the optimizer and gradients at once (the kernel lives on)
            close_run(self.accelerator, self.mirror, self.locks, bool(self.settings.log_with and self._fitted))
            for name in ("optimizer", "scheduler", "emas", "ema_params", "params", "stream", "models", "unwrapped"):
                self.__dict__.pop(name, None)

    def _loop(self, step_fn: Callable, bar: Any) -> None:
        s, acc = self.settings, self.accelerator
        flags = {"time": False, "interrupt": False}
        try:
            while True:
                # 1. learning rate: the scheduler sets it after each step; read it for the log
                lr = self.optimizer.param_groups[0]["lr"]
                # 2. evaluate, sample and checkpoint at their cadence; stop when the budget is spent
                self.pos = self.stream.position()
                done = self._budget_spent()
                if self.step != self.start_step or self.start_checkpoint is None:
                    self._cadence(done, flags)
                if done or flags["interrupt"]:
                    return
                # 3. forward and backward over grad_accum micro-batches (loss / grad_accum, synced on the last)
                t0 = time.perf_counter()
                keys, vals, flags = self._forward_backward(step_fn)
                # 4. clip and step, unless a loss was not finite on some process (then all skip together)
                self._update(keys, vals)
                self.window.timed(time.perf_counter() - t0, s.batch_size * s.grad_accum * acc.num_processes)
                # 5. log
                give_up = self.streak >= s.nan_patience
                if _due(s.log_every, self.step) or self._budget_spent() or give_up:
                    self._log_row(lr, bar)
                bar.update(1)
                if give_up:
                    raise NonFiniteLossError(nonfinite_message(self.step, self.streak, s.nan_patience, lr,
                                                                 self.last_checkpoint or self.start_checkpoint))
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread: save if the state is whole
            if acc.num_processes == 1 and not self._in_update and self.step > self.start_step:
                self.optimizer.zero_grad(set_to_none=True)
                acc.step = self.step * s.grad_accum
                self._save("interrupted")
            raise

    def _forward_backward(self, step_fn: Callable) -> tuple[list[str], list[float], dict[str, bool]]:
        """Step 3: forward and backward over the micro-batches, then one exchange between processes of the loss
        sums, the non-finite count, the checkpoint-timer and the Ctrl-C flags."""
        s, acc = self.settings, self.accelerator
        sums, bad = {}, torch.zeros((), device=self.device)
        for _ in range(s.grad_accum):
            batch = send_to_device(next(self.stream), self.device)
            with acc.accumulate(*self.models.values()):
                with acc.autocast():
                    losses = step_fn(self.models, batch)
                if "loss" not in losses:
                    raise KeyError(f"step_fn must return a dict with a 'loss' tensor; got {list(losses)}")
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + torch.as_tensor(v, device=self.device).detach().float()
                bad = bad + (~torch.isfinite(losses["loss"].detach())).float()
                acc.backward(losses["loss"])
        keys = sorted(sums)
        timer = s.checkpoint_minutes > 0 and time.monotonic() - self.last_save >= 60 * s.checkpoint_minutes
        vec = torch.stack([sums[k] for k in keys] + [bad, torch.tensor(float(timer), device=self.device),
                                                     torch.tensor(float(self._interrupt), device=self.device)])
        vals = (acc.reduce(vec, "sum") if acc.num_processes > 1 else vec).tolist()
        return keys, vals, {"time": vals[-2] > 0, "interrupt": vals[-1] > 0}

    def _update(self, keys: list[str], vals: list[float]) -> None:
        """Step 4: clip and step (EMA too), or skip the step on every process when a loss was not finite."""
        s, acc = self.settings, self.accelerator
        skip, norm = vals[-3] > 0, None
        if not skip:  # clipping off: max_norm=inf measures the norm (NaN gradients skip the step) and scales by 1
            norm = acc.clip_grad_norm_(self.params, s.max_grad_norm if s.max_grad_norm > 0 else math.inf).item()
            skip = not math.isfinite(norm) and acc.scaler is None  # fp16: GradScaler skips that step itself
        self._in_update = True  # from here to the step count, an interrupt cannot save a whole state
        if skip:
            self.skipped, self.streak = self.skipped + 1, self.streak + 1
        else:
            if not self.grads_checked:  # once, with several processes: equal gradients everywhere after backward
                self.grads_checked = check_grads_synced(self.accelerator, self.params)
            self.optimizer.step()
            if self.emas and not acc.optimizer_step_was_skipped:
                for name, ema in self.emas.items():
                    ema.step(self.ema_params[name])
            self.streak = 0
            scale = 1.0 / (s.grad_accum * acc.num_processes)  # mean over micro-batches and processes
            self.window.add({**{k: v * scale for k, v in zip(keys, vals)},
                             **({"grad_norm": norm} if norm is not None else {})})
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self._in_update = False

    # ---------------------------------------------------------------- setup and resume
    def _setup(self, models: dict[str, nn.Module], dataset: Dataset, collate_fn: Callable | None,
               batch_sampler_fn: Callable | None, lrs: dict[str, float]) -> None:
        s, acc = self.settings, self.accelerator
        if self._fitted:
            raise RuntimeError("Trainer.fit runs once per Trainer: make a new Trainer for another run")
        self._fitted = True
        found = on_main(acc, self._start)  # the locks, then the checkpoint to continue from (None: a fresh run)
        groups = param_groups(models, lrs, s.lr)
        self.optimizer = make_optimizer(s, groups, self.device, show=self.is_main)
        batches_fn = batch_sampler_fn or shuffled_batches(len(dataset), s.batch_size, s.seed)
        per_epoch = max(1, len(batches_fn(0)) // acc.num_processes // s.grad_accum)
        self.total_steps = min(n for n in (s.max_steps, s.max_epochs * per_epoch) if n > 0)
        self.scheduler = get_scheduler(s.lr_scheduler, self.optimizer, num_warmup_steps=s.warmup_steps,
                                       num_training_steps=self.total_steps)
        *prepared, self.optimizer = acc.prepare(*models.values(), self.optimizer)
        self.models = dict(zip(models, prepared))
        self.unwrapped = {name: acc.unwrap_model(m) for name, m in self.models.items()}
        self.params = [p for group in groups for p in group["params"]]
        self.ema_params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in self.unwrapped.items()}
        self.emas = make_emas(self.unwrapped, s.ema_decay, self.device) if s.ema else {}
        acc.register_for_checkpointing(self.scheduler, *self.emas.values())  # the optimizer is prepared
        register_portable_weights(acc)  # checkpoints resume under any process count
        self.step = self.skipped = self.streak = 0
        self.window, self.elapsed0, self._in_update = LossWindow(), 0.0, False
        self.last_checkpoint, self.grads_checked = None, acc.num_processes == 1
        self.start_checkpoint = Path(found) if found else None
        pos = {"epoch": 0, "micro_batches": 0}
        if self.start_checkpoint is not None:  # load last: nothing may draw random numbers after this
            state = load_checkpoint(acc, self.start_checkpoint)
            pos, self.step, self.elapsed0 = state["position"], state["step"], state["elapsed_s"]
            self.skipped, self.streak = state["skipped_nonfinite"], state["streak"]
            self.window.load_state_dict(state["window"])
            apply_hyperparameters(self.optimizer, self.scheduler, [lrs.get(n, s.lr) for n in self.models], s,
                                  self.emas.values())
        self.start_step, self.last_save, self.session_start = self.step, time.monotonic(), time.time()
        self.log = RunLog(self.run_dir / "log.csv", self.is_main, acc if s.log_with else None)
        self.log.truncate(self.step)  # logged losses then match an uninterrupted run
        if s.sync_dir and self.is_main:
            self.log.mirror = self.mirror = Mirror(self.run_dir, s.sync_dir, s.keep_checkpoints, lock=self.locks[-1])
        if s.log_with:
            acc.init_trackers("sdnb", config={k: v for k, v in asdict(s).items() if isinstance(v, (int, float, str))})
        loader_kwargs = dict(collate_fn=collate_fn, num_workers=s.num_workers, pin_memory=self.device.type == "cuda")
        self.stream = MicroBatches(dataset, batches_fn, acc.process_index, acc.num_processes, pos["epoch"],
                                   pos["micro_batches"] // acc.num_processes, s.seed, **loader_kwargs)

    def _start(self) -> str | None:
        """Main process: lock run_dir and sync_dir (the config's, when a stage mirrors weights itself), then choose,
        check and adopt the checkpoint to continue from (`sdnb.train.resume`)."""
        s = self.settings
        self.locks = lock_run(self.run_dir, s.sync_dir or self.config.get("sync_dir", ""))
        path = start(s.resume, self.run_dir, s.sync_dir, self.config)
        return str(path) if path is not None else None

    # ---------------------------------------------------------------- cadence: evaluate, sample, checkpoint
    def _budget_spent(self) -> bool:
        s = self.settings
        return (s.max_steps > 0 and self.step >= s.max_steps) or \
            (s.max_epochs > 0 and self.stream.epochs_done >= s.max_epochs)

    def _cadence(self, done: bool, flags: dict[str, bool]) -> None:
        s, step = self.settings, self.step
        if self.evaluate_fn and (_due(s.validate_every, step) or done):
            values = self._callback(self.evaluate_fn, step)
            if values is not None:
                row = {f"val_{k}".replace("val_val_", "val_"): float(v) for k, v in values.items()}
                self.log.append({"step": step, "epoch": round(self.stream.epochs_done, 4), **row})
        checkpoints_on = s.checkpoint_every > 0 or s.checkpoint_minutes > 0
        save = step > 0 and (flags["interrupt"] or self.streak == 0 and (
            _due(s.checkpoint_every, step) or flags["time"] or (done and checkpoints_on)))
        if self.sample_fn and not flags["interrupt"] and (_due(s.sample_every, step) or save or done):
            (self.run_dir / "samples").mkdir(exist_ok=True)
            self._callback(self.sample_fn, step, self.run_dir / "samples")
        if save:
            self._save("interrupted" if flags["interrupt"] else "final" if done else "time" if flags["time"] else "step")

    def _callback(self, fn: Callable, *args: Any) -> Any:
        """Run evaluate/sample on the main process with EMA weights, in eval mode, without touching the RNG."""
        result = None
        if self.is_main:
            with evaluation_mode(self.unwrapped, self.emas, self.ema_params, self.device, self.accelerator.autocast()):
                result = fn(self.unwrapped, *args)
        self.accelerator.wait_for_everyone()
        return result

    def _save(self, reason: str) -> None:
        s, acc = self.settings, self.accelerator
        before_save(acc, self.run_dir, self.step, self.unwrapped, self.locks, self.mirror,
                    lambda: state_bytes(self.unwrapped.values(), self.optimizer, self.emas.values()),
                    self.last_checkpoint or self.start_checkpoint)
        state = {"reason": reason, "position": self.pos, "elapsed_s": self._elapsed(), "skipped_nonfinite": self.skipped,
                 "streak": self.streak, "window": self.window.state_dict(), "num_processes": acc.num_processes,
                 "settings": asdict(s), "config": self.config, "models": list(self.models)}
        self.last_checkpoint = save_checkpoint(acc, self.run_dir, self.step, state)
        self.last_save = time.monotonic()
        if self.is_main:
            after_save(self.run_dir, self.step, s.keep_checkpoints, self.mirror)
        if reason == "interrupted" and self.is_main:
            print(f"saved an interrupted checkpoint: {self.last_checkpoint} (resume='latest' continues)", flush=True)

    def _write_final(self, save_final: Callable[[dict[str, nn.Module], Path], None]) -> Path:
        """Write run_dir/final (EMA weights if ema) through a temporary folder, if it fits."""
        def write(tmp: Path) -> None:
            with ema_weights(self.emas, self.ema_params):
                save_final(self.unwrapped, tmp)
        on_main(self.accelerator, lambda: write_final(self.run_dir, write, state_bytes(self.unwrapped.values())))
        if self.mirror:
            self.mirror.request("final", "log")
        return self.run_dir / "final"

    # ---------------------------------------------------------------- logging and guards
    def _elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.session_start

    def _log_row(self, lr: float, bar: Any) -> None:
        row = {"step": self.step, "epoch": round(self.stream.epochs_done, 4), **self.window.row(), "lr": lr,
               "skipped_nonfinite": self.skipped, "elapsed_s": round(self._elapsed(), 2)}
        if self.mirror:
            row["sync_errors"] = len(self.mirror.errors)
        self.log.append(row)
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", img_s=f"{row['images_per_s']:.3g}")
        if self.is_main and self.log.explosion(lr):  # once per run: the loss diverged, lr is too high
            record(self.run_dir, self.log.exploded)
        self.window.reset()
