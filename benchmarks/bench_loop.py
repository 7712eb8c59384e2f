"""The shared loop's overhead: `Trainer.fit` against a bare `for` loop around the same step, same run.

    python benchmarks/bench_loop.py                 # tiny AutoencoderKL, 32 px, batch 4
    python benchmarks/bench_loop.py --size 64 --channels 32,64 --steps 40 --threads 2
    python benchmarks/bench_loop.py --pixel --steps 300    # a step that costs ~nothing: the loop's own ms/step

Both loops run the same model, data, AdamW and gradient clipping; rounds alternate (bare, loop, bare, ...)
so that a busy machine slows both alike, and the medians are compared. The loop adds per step: the
accumulate/autocast contexts, the finiteness check and the loss read-back (one device sync), the LR
scheduler, the log window, and a log.csv row every `log_every` steps. Checkpoints are off here; the cost
of one checkpoint is printed on its own.

Measured on the 2-core dev machine while other jobs ran (load 6-8, so rounds vary by +-20%), 1 thread:
tiny VAE 32 px: 80.9 vs 78.7 ms/step (1.03) and 94.6 vs 89.5 (1.06); 658k-param VAE 64 px: 1.08;
1x1 conv: 3.3 vs 1.7 ms/step, i.e. the loop's own cost is ~1.6 ms/step, ~0.6 ms of it accelerate's
per-step `is_lomo_available()` package look-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sdnb.train import TrainConfig, Trainer


def tiny_vae(channels: tuple[int, ...]) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=8)


class PixelModel(nn.Module):
    """A 1x1 convolution with the VAE's output type: the step costs almost nothing, so the loop's own cost shows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor):
        from diffusers.models.autoencoders.vae import DecoderOutput
        return DecoderOutput(sample=self.conv(x))


def step_fn(models: dict[str, nn.Module], batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    x = batch[0]
    recon = models["vae"](x).sample
    mse = F.mse_loss(recon, x)
    return {"loss": mse, "mse": mse.detach()}


def bare(model: nn.Module, data: TensorDataset, steps: int, batch: int) -> float:
    """Seconds per step of the plainest loop around the same step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    it, start = iter(loader), time.perf_counter()
    for _ in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        loss = step_fn({"vae": model}, b)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def loop(model: nn.Module, data: TensorDataset, steps: int, batch: int, run_dir: Path, **kw) -> float:
    """Seconds per step of Trainer.fit, from the first step to the final save (one-time setup excluded)."""
    trainer = Trainer(TrainConfig(run_dir=str(run_dir), max_steps=steps, batch_size=batch, log_every=10, checkpoint_every=0,
                                  checkpoint_minutes=0.0, mixed_precision="no", **kw))
    calls: list[float] = []

    def timed_step(models, b):
        calls.append(time.perf_counter())
        return step_fn(models, b)

    end = {}
    trainer.fit({"vae": model}, timed_step, data, save_final=lambda m, path: end.setdefault("t", time.perf_counter()))
    return (end["t"] - calls[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each loop")
    parser.add_argument("--size", type=int, default=32, help="image size (px)")
    parser.add_argument("--batch", type=int, default=4, help="batch size")
    parser.add_argument("--channels", default="8,16", help="block_out_channels of the VAE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models are fastest on 1)")
    parser.add_argument("--pixel", action="store_true", help="a 1x1 conv instead of the VAE: the loop's own cost")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    make = PixelModel if args.pixel else lambda: tiny_vae(channels)
    data = TensorDataset(torch.rand(64, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    n_params = sum(p.numel() for p in make().parameters())
    print(f"{'1x1 conv' if args.pixel else f'AutoencoderKL {channels}'} ({n_params / 1e3:.1f}k params), "
          f"{args.size} px, batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    results: dict[str, list[float]] = {"bare": [], "loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        bare(make(), data, 5, args.batch)  # warm-up
        for r in range(args.rounds):
            results["bare"].append(bare(make(), data, args.steps, args.batch))
            results["loop"].append(loop(make(), data, args.steps, args.batch, Path(tmp) / f"r{r}"))
        trainer_dir = Path(tmp) / "ckpt"
        start = time.perf_counter()
        loop(make(), data, 2, args.batch, trainer_dir, checkpoint_every=1)
        with_ckpt = time.perf_counter() - start
        start = time.perf_counter()
        loop(make(), data, 2, args.batch, Path(tmp) / "nockpt")
        checkpoint_s = (with_ckpt - (time.perf_counter() - start)) / 2
    b, lp = statistics.median(results["bare"]), statistics.median(results["loop"])
    print(f"bare for-loop : {1e3 * b:7.2f} ms/step  (rounds: {', '.join(f'{1e3 * x:.2f}' for x in results['bare'])})")
    print(f"Trainer.fit   : {1e3 * lp:7.2f} ms/step  (rounds: {', '.join(f'{1e3 * x:.2f}' for x in results['loop'])})")
    print(f"ratio loop/bare: {lp / b:.3f}   (overhead {1e3 * (lp - b):+.2f} ms/step)")
    print(f"one checkpoint (save_state + sdnb_state.json + rename): ~{1e3 * checkpoint_s:.0f} ms")


if __name__ == "__main__":
    main()
