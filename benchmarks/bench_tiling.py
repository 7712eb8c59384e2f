"""Memory of seamless tiled reconstruction (`sdnb.vae.tiling`) with the SD v1 VAE, traced on the meta device (no
weights, no GPU needed): the accelerator's peak (tile tensors alive at once + attention + weights) and the peak of
the whole maps held on the store device (the CPU by default), against one untiled pass traced the same way.

    python benchmarks/bench_tiling.py                      # 2048x2048, tile 512, fp32 and fp16
    python benchmarks/bench_tiling.py --size 1024 --tile 256

Every op's output is counted while alive (views and in-place ops share storage and are not counted again).
The attention here takes PyTorch's math path (scores of chunk x tokens materialised); on a CUDA GPU the
memory-efficient kernel needs less.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdnb.vae import tiling

GiB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Bytes of op outputs alive, and their peak; allocations while `storing` count as stored maps instead."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.stored = self.stored_peak = 0
        self.storing = False

    def _free(self, n: int, stored: bool) -> None:
        if stored:
            self.stored -= n
        else:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op: no new memory
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                if self.storing:
                    self.stored += n
                    self.stored_peak = max(self.stored_peak, self.stored)
                else:
                    self.live += n
                    self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n, self.storing)
        return out


class TracedTiler(tiling.Tiler):
    """A Tiler for meta tensors: GroupNorm statistics are traced but not combined (meta tensors have no values)."""

    mode: LiveBytes

    def norm(self, x, gn):
        if self.dry:
            return super().norm(x, gn)
        for region in self._visit(x):
            torch.var_mean(x.read(region).float().reshape(gn.num_groups, -1), dim=1, correction=0)
        scale = torch.ones(x.channels, 1, 1, device=self.device)
        return lambda v: (v.float() * scale + scale).to(v.dtype)

    def store(self, x):
        if self.dry:
            return super().store(x)
        self.mode.storing = True
        out = torch.empty(1, x.channels, x.height, x.width, dtype=self.dtype, device=self.store_device)
        self.mode.storing = False
        for y0, y1, x0, x1 in self._visit(x):
            out[..., y0:y1, x0:x1] = x.read((y0, y1, x0, x1))
        return tiling.Stored(out, self.device, self.dtype)


def trace(size: int, tile: int, dtype: torch.dtype) -> tuple[float, float, float, int]:
    """(accelerator peak without weights, stored-map peak, weights) in GiB and the tile visits, for a tiled
    reconstruction of one size x size image."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config_dict())
    vae = vae.to(dtype).eval()
    weights = sum(p.numel() * p.element_size() for p in vae.parameters()) / GiB
    mode = LiveBytes()
    TracedTiler.mode = mode
    x = torch.empty(1, 3, size, size, device="meta", dtype=dtype)
    visits = 0
    with torch.no_grad(), mode:
        for step in (tiling.encoder, tiling.decoder):
            t = TracedTiler("meta", dtype, tile, vae.config.block_out_channels[0], "meta")
            out = step(t, vae, tiling.Stored(x, "meta", dtype)).tensor
            visits += t.visits
            x = out[:, : out.shape[1] // 2] if step is tiling.encoder else out
    return mode.peak / GiB, mode.stored_peak / GiB, weights, visits


def untiled(size: int, dtype: torch.dtype) -> float:
    """Peak of op outputs alive in one untiled encode + decode (GiB), traced the same way."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config_dict())
    vae = vae.to(dtype).eval()
    mode = LiveBytes()
    with torch.no_grad(), mode:
        vae.decode(vae.encode(torch.empty(1, 3, size, size, device="meta", dtype=dtype)).latent_dist.mode())
    return mode.peak / GiB


def config_dict() -> dict:
    """SD v1's VAE (CompVis/stable-diffusion-v1-4, vae/config.json)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    print(f"SD v1 VAE, {args.size}x{args.size}, tile {args.tile}: peak GiB (traced on meta)")
    print(f"{'dtype':<8}{'accelerator':>12}{'+weights':>10}{'stored maps':>13}{'untiled':>10}{'ratio':>7}{'tiles':>7}")
    for dtype in (torch.float32, torch.float16):
        peak, stored, weights, visits = trace(args.size, args.tile, dtype)
        one = untiled(args.size, dtype)
        print(f"{str(dtype).split('.')[-1]:<8}{peak:>12.2f}{peak + weights:>10.2f}{stored:>13.2f}{one:>10.2f}"
              f"{peak / one:>7.2f}{visits:>7d}")


if __name__ == "__main__":
    main()
