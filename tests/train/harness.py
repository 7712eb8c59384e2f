"""The harness the loop, checkpoint and sync tests share: a tiny real AutoencoderKL, patches of a photo, a step
function, `train(...)`, and a child entry point (`python tests/train/harness.py '<json>'`) that trains in a
subprocess (the SIGKILL and torchrun tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from skimage import data as skdata
from torch import nn
from torch.utils.data import Dataset

from sdnb.train import Trainer, TrainConfig, read_log

HERE = Path(__file__).resolve().parent
LOSS_COLUMNS = ("loss", "mse", "kl")


# ---------------------------------------------------------------- harness
def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A 2-level AutoencoderKL with 8/16 channels (~60k parameters)."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


class AE(nn.Module):
    """The VAE as one module whose forward returns (reconstruction, KL), as a stage would wrap it."""

    def __init__(self, vae: AutoencoderKL, sample_posterior: bool = True):
        super().__init__()
        self.vae, self.sample_posterior = vae, sample_posterior

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if self.sample_posterior else posterior.mode()  # sample() uses the torch RNG
        return self.vae.decode(z).sample, posterior.kl()


class Patches(Dataset):
    """16x16 crops of skimage's astronaut in [-1, 1], fixed per index; items are {"x": image, "i": index}."""

    def __init__(self, n: int = 32, size: int = 16):
        image = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
        g = torch.Generator().manual_seed(0)
        ys, xs = torch.randint(0, 512 - size, (2, n), generator=g)
        self.items = [image[:, y:y + size, x:x + size].clone() for y, x in zip(ys.tolist(), xs.tolist())]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.items[i], "i": i}


def step_fn(models: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
    """MSE (mean over the batch) + 1e-6 * KL (mean over the batch)."""
    recon, kl = models["ae"](batch["x"])
    mse, kl = F.mse_loss(recon.float(), batch["x"]), kl.float().mean()
    return {"loss": mse + 1e-6 * kl, "mse": mse.detach(), "kl": kl.detach()}


def settings(run_dir: Path | str, **kw) -> TrainConfig:
    """The tests' loop settings: 20 steps of batch 2, a log row every 2 steps, a checkpoint every 5, no timer."""
    base = dict(run_dir=str(run_dir), lr=2e-3, batch_size=2, max_steps=20, log_every=2, checkpoint_every=5,
                checkpoint_minutes=0.0, max_grad_norm=1.0, seed=0, mixed_precision="no")
    return TrainConfig(**{**base, **kw})


def train(run_dir: Path, fn=step_fn, sample_posterior: bool = True, **kw):
    """Train a fresh tiny AE; returns (TrainResult, model)."""
    trainer = Trainer(settings(run_dir, **kw))
    model = AE(tiny_vae(), sample_posterior)
    return trainer.fit({"ae": model}, fn, Patches()), model


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def logged(run_dir: Path) -> list[tuple]:
    """(step, loss columns) of the training rows of a log.csv."""
    return [(r["step"],) + tuple(r[c] for c in LOSS_COLUMNS) for r in read_log(run_dir / "log.csv") if "loss" in r]


# ---------------------------------------------------------------- child process
def child(args: dict) -> None:
    """Train in this process with settings `args`; record the indices seen and the weights (per rank)."""
    sample_posterior = args.pop("sample_posterior", False)
    trainer = Trainer(settings(**args))
    rank, seen = trainer.accelerator.process_index, []

    def recording(models, batch):
        seen.extend(batch["i"].tolist())
        return step_fn(models, batch)

    model = AE(tiny_vae(), sample_posterior)
    trainer.fit({"ae": model}, recording, Patches())
    run_dir = Path(args["run_dir"])
    (run_dir / f"seen_{rank}.json").write_text(json.dumps(seen))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, run_dir / f"weights_{rank}.pt")


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
