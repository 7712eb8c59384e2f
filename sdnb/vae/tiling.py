"""Seamless tiled encoding and decoding: a whole image through SD's VAE one tile at a time, equal to the untiled
result up to floating-point rounding.

Why diffusers' own tiling (`vae.enable_tiling()`) shows seams: each tile runs through the network alone, so every
GroupNorm normalises it with that tile's own mean and variance, and neighbouring tiles disagree (most visibly in
dark, flat regions); blending the overlaps only softens the blocks. Here the network runs layer by layer over the
whole feature map, one tile at a time (the approach of "Tiled VAE", github.com/pkuliyi2015/
multidiffusion-upscaler-for-automatic1111, made exact):

- at each GroupNorm every tile's core is visited first and the per-group mean and variance of the WHOLE map are
  accumulated (Chan et al.'s pairwise update, in float64), then every tile is normalised with them;
- each convolution reads its tile with a halo as wide as its reach (1 px for a 3x3 convolution), clamped at the
  image border, so the zero padding falls exactly where the untiled network has it and the core is exact: no
  overlap blending is needed, since the cores already agree;
- the mid-block's self-attention is global: it runs over the whole latent-resolution map (small: 512 channels x
  256 x 256 for a 2048 px image), in chunks of queries;
- whole maps live on `store_device` (the CPU by default) between layers; the accelerator holds one tile at a time.
  A ResNet block stores only its input and output: its inner activation is recomputed tile by tile (1.5x its
  first convolution's cost) and up-sampled maps are never stored, which keeps the stored maps small.

Memory at 2048x2048 with the SD v1 VAE, tile_size 512, encode + decode (`benchmarks/bench_tiling.py`, traced on the
meta device): accelerator peak 1.44 GiB in fp32 (1.29 GiB fp16), weights included, so it fits a 16 GB T4 with room
to spare; the whole maps on the CPU peak at 4.0 GiB in fp32 (2.0 GiB fp16); one untiled pass would need ~33 GiB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm

Region = tuple[int, int, int, int]  # y0, y1, x0, x1


class Map:
    """A feature map (1, C, H, W) that can be read region by region, on the compute device."""

    def __init__(self, channels: int, height: int, width: int, compute: Callable[[Region], torch.Tensor],
                 work: int = 0):
        self.channels, self.height, self.width, self.compute = channels, height, width, compute
        self.work = max(channels, work)  # the most channels computing a tile holds per pixel (sizes its tiles)

    def read(self, region: Region) -> torch.Tensor:
        return self.compute(region)


class Stored(Map):
    """A map held whole on the store device."""

    def __init__(self, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype):
        _, c, h, w = tensor.shape
        super().__init__(c, h, w, lambda r: tensor[..., r[0]:r[1], r[2]:r[3]].to(device, dtype))
        self.tensor = tensor


def with_halo(x: Map, region: Region, halo: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn(x read over `region` widened by `halo`, clamped to the map), cropped back to `region`: exact for a chain of
    `halo` stride-1 3x3 convolutions and pointwise operations."""
    y0, y1, x0, x1 = region
    a0, a1, b0, b1 = max(0, y0 - halo), min(x.height, y1 + halo), max(0, x0 - halo), min(x.width, x1 + halo)
    out = fn(x.read((a0, a1, b0, b1)))
    return out[..., y0 - a0:y1 - a0, x0 - b0:x1 - b0]


def same(x: Map, fn: Callable[[torch.Tensor], torch.Tensor], halo: int, channels: int) -> Map:
    """A lazy map: `fn` (stride 1, reach `halo`) applied to `x`, computed when read."""
    return Map(channels, x.height, x.width, lambda r: with_halo(x, r, halo, fn), x.work)


def upsample(x: Map, up: nn.Module) -> Map:
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution), lazy: never stored at the doubled size."""
    if getattr(up, "use_conv_transpose", False) or getattr(up, "norm", None) is not None or not up.use_conv:
        raise NotImplementedError(f"tiled decoding does not support this {type(up).__name__}; use tile_size=None")

    def compute(region: Region) -> torch.Tensor:
        y0, y1, x0, x1 = region
        a0, a1, b0, b1 = max(0, y0 // 2 - 1), min(x.height, y1 // 2 + 2), max(0, x0 // 2 - 1), min(x.width, x1 // 2 + 2)
        v = F.interpolate(x.read((a0, a1, b0, b1)), scale_factor=2.0, mode="nearest")
        return up.conv(v)[..., y0 - 2 * a0:y1 - 2 * a0, x0 - 2 * b0:x1 - 2 * b0]

    return Map(up.conv.out_channels, 2 * x.height, 2 * x.width, compute, x.channels)


def downsample(x: Map, down: nn.Module) -> Map:
    """diffusers' Downsample2D (a stride-2 3x3 convolution; with padding 0 the input is first padded right and
    bottom by one zero), lazy."""
    conv = down.conv
    if not isinstance(conv, nn.Conv2d) or getattr(down, "norm", None) is not None or conv.kernel_size != (3, 3):
        raise NotImplementedError(f"tiled encoding does not support this {type(down).__name__}; use tile_size=None")
    p = conv.padding[0]
    extra = 1 if p == 0 else 0
    ho, wo = (x.height + 2 * p + extra - 3) // 2 + 1, (x.width + 2 * p + extra - 3) // 2 + 1

    def compute(region: Region) -> torch.Tensor:
        y0, y1, x0, x1 = region
        ya, yb, xa, xb = 2 * y0 - p, 2 * y1 - p + 1, 2 * x0 - p, 2 * x1 - p + 1  # input rows/cols read, padded
        v = x.read((max(0, ya), min(x.height, yb), max(0, xa), min(x.width, xb)))
        v = F.pad(v, (max(0, -xa), max(0, xb - x.width), max(0, -ya), max(0, yb - x.height)))
        return F.conv2d(v, conv.weight, conv.bias, stride=2)

    return Map(conv.out_channels, ho, wo, compute, x.work)


class Tiler:
    """Runs passes over the tiles of maps: GroupNorm statistics of a whole map, and storing a map.

    `tile_size` is the tile side in pixels for a map with `base_channels` channels; maps with more channels get
    smaller tiles (the same number of elements). `dry=True` only counts the tile visits (for the progress bar)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, tile_size: int, base_channels: int,
                 store_device: torch.device | str = "cpu", dry: bool = False, bar: tqdm | None = None):
        self.device, self.dtype, self.store_device = torch.device(device), dtype, torch.device(store_device)
        self.budget, self.dry, self.bar, self.visits = tile_size ** 2 * base_channels, dry, bar, 0

    def tiles(self, x: Map) -> list[Region]:
        """The core regions covering `x`, of near-equal size."""
        side = max(8, int((self.budget / x.work) ** 0.5))
        ny, nx = -(-x.height // side), -(-x.width // side)
        ys = [round(i * x.height / ny) for i in range(ny + 1)]
        xs = [round(i * x.width / nx) for i in range(nx + 1)]
        return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(ny) for j in range(nx)]

    def _visit(self, x: Map):
        for region in self.tiles(x):
            self.visits += 1
            if self.bar is not None:
                self.bar.update()
            yield region

    def norm(self, x: Map, gn: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        """GroupNorm `gn` with the statistics of the whole map `x`, as a function of a tile."""
        if self.dry:
            for _ in self._visit(x):
                pass
            return lambda v: v
        g = gn.num_groups
        count, mean, m2 = 0, torch.zeros(g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
        for region in self._visit(x):
            v = x.read(region).float().reshape(g, -1)
            var_t, mean_t = torch.var_mean(v, dim=1, correction=0)
            n, mean_t, var_t = v.shape[1], mean_t.double().cpu(), var_t.double().cpu()
            delta, total = mean_t - mean, count + n
            mean = mean + delta * n / total  # Chan et al.: merge (count, mean, m2) with the tile's
            m2 = m2 + var_t * n + delta ** 2 * count * n / total
            count = total
        inv = (m2 / count + gn.eps).rsqrt().repeat_interleave(x.channels // g).float().to(self.device)
        mean_c = mean.repeat_interleave(x.channels // g).float().to(self.device)
        weight = gn.weight.float() if gn.affine else torch.ones_like(inv)
        bias = gn.bias.float() if gn.affine else torch.zeros_like(inv)
        scale, shift = (weight * inv)[:, None, None], (bias - mean_c * weight * inv)[:, None, None]
        return lambda v: (v.float() * scale + shift).to(v.dtype)

    def store(self, x: Map) -> Stored:
        """Compute `x` tile by tile and hold it whole on the store device."""
        if self.dry:
            for _ in self._visit(x):
                pass
            return Stored(torch.empty(1, x.channels, x.height, x.width, device="meta"), self.device, self.dtype)
        out = torch.empty(1, x.channels, x.height, x.width, dtype=self.dtype, device=self.store_device)
        for y0, y1, x0, x1 in self._visit(x):
            out[..., y0:y1, x0:x1] = x.read((y0, y1, x0, x1)).to(self.store_device)
        return Stored(out, self.device, self.dtype)


def resnet(t: Tiler, block: nn.Module, x: Map) -> Stored:
    """diffusers' ResnetBlock2D (no time embedding): x + conv2(act(norm2(conv1(act(norm1(x)))))), tile by tile.
    The inner activation is not stored: it is computed once for norm2's statistics and again for the output."""
    if getattr(block, "time_emb_proj", None) is not None or block.upsample is not None or block.downsample is not None:
        raise NotImplementedError("tiled VAE: a ResnetBlock2D with a time embedding or resampling; use tile_size=None")
    act = block.nonlinearity
    n1 = t.norm(x, block.norm1)
    h = same(x, lambda v: block.conv1(act(n1(v))), 1, block.conv1.out_channels)
    n2 = t.norm(h, block.norm2)

    def compute(region: Region) -> torch.Tensor:
        out = with_halo(h, region, 1, lambda v: block.conv2(act(n2(v))))
        skip = x.read(region)
        if block.conv_shortcut is not None:
            skip = block.conv_shortcut(skip)
        return (skip + out) / block.output_scale_factor

    return t.store(Map(block.conv2.out_channels, x.height, x.width, compute, x.work))


def attention(t: Tiler, attn: nn.Module, x: Map, chunk: int = 1024) -> Stored:
    """diffusers' Attention as the VAE's mid-block uses it (GroupNorm, one head or more, residual), over the whole
    map: it is small at latent resolution; queries go in chunks so the scores never exceed chunk x H*W."""
    if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "norm_q", None) is not None:
        raise NotImplementedError("tiled VAE: this attention block is not supported; use tile_size=None")
    full = t.store(x)
    if t.dry:
        return full
    v = full.read((0, x.height, 0, x.width))
    b, c, hh, ww = v.shape
    tokens = v.reshape(b, c, hh * ww).transpose(1, 2)
    normed = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2) if attn.group_norm is not None else tokens
    key, value = attn.to_k(normed), attn.to_v(normed)
    heads = attn.heads
    split = lambda z: z.reshape(b, -1, heads, z.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    key, value = split(key), split(value)
    out = torch.empty_like(tokens)
    for s in range(0, tokens.shape[1], chunk):
        q = split(attn.to_q(normed[:, s:s + chunk]))
        o = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(b, -1, c)
        o = attn.to_out[1](attn.to_out[0](o.to(q.dtype)))
        out[:, s:s + chunk] = (o + tokens[:, s:s + chunk]) if attn.residual_connection else o
    out = (out / attn.rescale_output_factor).transpose(1, 2).reshape(b, c, hh, ww)
    return Stored(out.to(t.store_device), t.device, t.dtype)


def mid_block(t: Tiler, mid: nn.Module, x: Map) -> Map:
    """diffusers' UNetMidBlock2D: resnet, then (attention, resnet) pairs."""
    x = resnet(t, mid.resnets[0], x)
    for attn, block in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            x = attention(t, attn, x)
        x = resnet(t, block, x)
    return x


def head(t: Tiler, net: nn.Module, x: Map) -> Stored:
    """conv_out(act(conv_norm_out(x))): the end of diffusers' Encoder and Decoder."""
    if not isinstance(net.conv_norm_out, nn.GroupNorm):
        raise NotImplementedError("tiled VAE: a decoder with SpatialNorm is not supported; use tile_size=None")
    n = t.norm(x, net.conv_norm_out)
    return t.store(same(x, lambda v: net.conv_out(net.conv_act(n(v))), 1, net.conv_out.out_channels))


def encoder(t: Tiler, vae: AutoencoderKL, x: Map) -> Stored:
    """diffusers' Encoder and quant_conv, tile by tile: the posterior's moments (mean, log-variance)."""
    enc = vae.encoder
    h: Map = same(x, enc.conv_in, 1, enc.conv_in.out_channels)
    for block in enc.down_blocks:
        if getattr(block, "attentions", None):
            raise NotImplementedError(f"tiled VAE: {type(block).__name__} is not supported; use tile_size=None")
        for r in block.resnets:
            h = resnet(t, r, h)
        for d in block.downsamplers or []:
            h = downsample(h, d)
    out: Map = head(t, enc, mid_block(t, enc.mid_block, h))
    if vae.quant_conv is not None:
        out = t.store(same(out, vae.quant_conv, 0, vae.quant_conv.out_channels))
    return out


def decoder(t: Tiler, vae: AutoencoderKL, z: Map) -> Stored:
    """post_quant_conv and diffusers' Decoder, tile by tile: the image in [-1, 1] (not clamped)."""
    dec = vae.decoder
    if vae.post_quant_conv is not None:
        z = same(z, vae.post_quant_conv, 0, vae.post_quant_conv.out_channels)
    h: Map = mid_block(t, dec.mid_block, same(z, dec.conv_in, 1, dec.conv_in.out_channels))
    for block in dec.up_blocks:
        if getattr(block, "attentions", None):
            raise NotImplementedError(f"tiled VAE: {type(block).__name__} is not supported; use tile_size=None")
        for r in block.resnets:
            h = resnet(t, r, h)
        for u in block.upsamplers or []:
            h = upsample(h, u)
    return head(t, dec, h)


def _run(vae: AutoencoderKL, x: torch.Tensor, tile_size: int, step: Callable, desc: str, progress: bool,
         store_device: torch.device | str) -> torch.Tensor:
    """Run `step(tiler, vae, map)` on (1, C, H, W) `x`: first dry (counting tile visits), then for real."""
    device, dtype = vae.device, vae.dtype
    base = vae.config.block_out_channels[0]
    dry = Tiler(device, dtype, tile_size, base, store_device, dry=True)
    step(dry, vae, Stored(torch.empty(x.shape, device="meta"), device, dtype))
    with tqdm(total=dry.visits, desc=desc, unit="tile", disable=not progress, leave=False) as bar:
        t = Tiler(device, dtype, tile_size, base, store_device, bar=bar)
        return step(t, vae, Stored(x.to(store_device, dtype), device, dtype)).tensor


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, images: torch.Tensor, tile_size: int = 512, progress: bool = True,
                 store_device: torch.device | str = "cpu") -> torch.Tensor:
    """The posterior moments (N, 2*latent channels, H/f, W/f) of images (N, 3, H, W) in [-1, 1], tile by tile with
    whole-image GroupNorm statistics (see the module docstring); equal to `vae.encode(images)` up to rounding."""
    return torch.cat([_run(vae, x[None], tile_size, encoder, "encoding tiles", progress, store_device)
                      for x in images])


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile_size: int = 512, progress: bool = True,
                 store_device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (N, 3, H, W) from latents (N, C, h, w), tile by tile; equal to `vae.decode(latents).sample` up to
    rounding. `tile_size` is in image pixels."""
    return torch.cat([_run(vae, z[None], tile_size, decoder, "decoding tiles", progress, store_device)
                      for z in latents])
