"""The memory plan (`sdnb.memory`) against a real CPU training step: RSS growth of one step (forward, backward, the
first AdamW step with foreach ops, as on a GPU) over the memory held before it, vs the plan's gradients + optimizer
state + activations for the same model, shape and precision (fp32). Each case runs in a fresh process.

    python benchmarks/bench_memory.py   # tiny VAE and tiny UNet at two sizes, the SD-shaped VAE at 96 and 160 px
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import psutil
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdnb.demo.fullsize import SD15_VAE
from sdnb.memory import Choices, LiveBytes, fake_tensors, step_peak
from sdnb.memory.count import to_fake
from sdnb.memory.table import usage

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16)
# glibc keeps freed blocks below its (dynamic) mmap threshold in the heap, so RSS would hold dead tensors; a fixed
# threshold maps every tensor over 128 KiB on its own and returns it when freed, as a GPU's allocator frees blocks
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
CASES = [("tiny VAE", "vae", TINY_VAE, 128, 8), ("tiny VAE", "vae", TINY_VAE, 256, 8),
         ("tiny UNet", "unet", TINY_UNET, 256, 8), ("tiny UNet", "unet", TINY_UNET, 384, 8),
         ("SD VAE", "vae", SD15_VAE, 96, 1), ("SD VAE", "vae", SD15_VAE, 160, 1)]


def build(kind: str, config: dict):
    """The model, from its config."""
    return (AutoencoderKL if kind == "vae" else UNet2DConditionModel).from_config(config)


def step_of(kind: str, model, size: int, batch: int):
    """A step returning the loss (the VAE reconstructs; the UNet predicts noise at latent size/8)."""
    if kind == "vae":
        x = torch.randn(batch, 3, size, size)
        return lambda: (model(x).sample - x).pow(2).mean()
    x, states, t = torch.randn(batch, 4, size // 8, size // 8), torch.randn(batch, 77, 32), torch.tensor([10] * batch)
    return lambda: model(x, t, states).sample.pow(2).mean()


def planned(kind: str, config: dict, size: int, batch: int) -> tuple[int, int]:
    """The plan's bytes held after the forward (what autograd saved), and beyond the weights over the whole step
    (gradients, optimizer state and the step's activations)."""
    with torch.device("meta"):
        model = build(kind, config)
    mode = fake_tensors()
    to_fake(mode, model)
    with mode:
        params, step = list(model.parameters()), step_of(kind, model, size, batch)
        with LiveBytes() as live:
            loss = step()
            forward = live.live
        del loss
        peak = step_peak(step, params, "no")
    u = usage(Choices(batch, 1, size, "no", "adamw", False), params, [], *peak)
    return forward, u.gradients + u.optimizer + u.activations


def measured(kind: str, config: dict, size: int, batch: int) -> tuple[int, int]:
    """RSS growth over the RSS before training: after the first forward, and at the peak of two whole steps
    (forward, backward, AdamW with foreach ops as on a GPU: the second runs with the optimizer state, as the plan
    counts); run in a fresh process."""
    torch.manual_seed(0)
    model = build(kind, config)
    step = step_of(kind, model, size, batch)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    process = psutil.Process()
    before = process.memory_info().rss
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= before * 1.02, "setup peaked above the step"
    loss = step()
    forward = process.memory_info().rss - before
    loss.backward()
    optimizer.step()  # the first step makes the optimizer state; the plan is for the steps after it
    optimizer.zero_grad(set_to_none=True)
    del loss
    step().backward()
    optimizer.step()
    return forward, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def main() -> None:
    if len(sys.argv) > 1:  # a child: measure one case
        name, kind, size, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        config = next(c for n, k, c, s, b in CASES if n == name)
        print(json.dumps(measured(kind, config, size, batch)))
        return
    print(f"{'model':10} {'size':>5} {'batch':>5} | after forward: {'plan':>7} {'RSS':>7} {'ratio':>6} | whole step: "
          f"{'plan':>7} {'RSS':>7} {'ratio':>6}   (MiB)")
    only = os.environ.get("BENCH_ONLY", "")  # e.g. BENCH_ONLY="SD VAE"
    for name, kind, config, size, batch in [c for c in CASES if c[0].startswith(only)]:
        out = subprocess.run([sys.executable, __file__, name, kind, str(size), str(batch)], capture_output=True,
                             text=True, check=True, env=ENV).stdout
        real, plan = json.loads(out.strip().splitlines()[-1]), planned(kind, config, size, batch)
        cells = [f"{p / 2**20:7.1f} {r / 2**20:7.1f} {p / r:6.3f}" for p, r in zip(plan, real)]
        print(f"{name:10} {size:5d} {batch:5d} |                {cells[0]} |              {cells[1]}", flush=True)


if __name__ == "__main__":
    main()
