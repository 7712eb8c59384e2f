"""VAE training speed and memory under the main options, as ratios to plain fp32, and the step's achieved FLOP/s.

    python benchmarks/bench_vae.py                           # tiny VAE at 64 px batch 8, SD's VAE at 128 px batch 2
    python benchmarks/bench_vae.py --models tiny066          # the tiny VAE the fundus article's trainer was measured with (~2 min)
    python benchmarks/bench_vae.py --models sd --sd-sizes 128:2,256:1 --sd-steps 3 --threads 2
    python benchmarks/bench_vae.py --models tiny --tiny-steps 4  # quick

Models: "tiny" is sdnb's tiny VAE (`sdnb.demo.models.tiny_vae`, 0.24 M parameters, the embedded default's
architecture), "tiny066" the 0.66 M-parameter VAE the fundus article's trainer was measured with (channels 32/64, one layer per
block), "sd" the full-size SD v1 VAE architecture (83.7 M parameters) with random init - no download.
Speed does not depend on the weights' values.

Every step is the same math: `VAEWithPosterior` -> `vae_loss` with the "sdnb" recipe's weights
(MSE 1, LPIPS 0.1 with a random AlexNet backbone - its cost is included -, KL 1e-6), backward, gradient
clipping at 1.0, AdamW. Variants: plain fp32 (the baseline), channels_last (model, LPIPS and batch),
gradient checkpointing, decoder-only (`prepare_for_training(vae, "decoder")`: the frozen encoder still runs, without
a graph), decoder-only on cached latents (`PatchLatents`: the step decodes a sample of the stored
posterior; the one-time encoding pass is in "setup s", not in images/s), and bf16 autocast with fp32 master
weights (this CPU has AMX: bf16 matmuls run several times faster than fp32).

Each variant runs in a fresh subprocess. images/s = batch / median step time over the timed steps (after
warm-up steps; the median resists other processes' bursts). Memory is RSS, not tracemalloc: RSS is read
(psutil) before the first step, with the model, LPIPS, the data (and the latent cache) in memory; after the
warm-up the process's peak RSS (VmHWM) is reset (/proc/self/clear_refs). "peak GB" is the peak RSS over the
timed steps (imports of torch/diffusers included, as in the measurements of the article's trainer), "train GB" that peak minus the
RSS before the first step: what training adds (AdamW state, gradients, activations).
Threads: 1 by default (--threads). On this shared 2-core machine, whenever another process keeps a core busy,
2 OpenMP threads stall at every parallel region: measured at load ~3.6, an SD VAE step at 128 px took 25-30 s
on 2 threads and 15 s on 1, and the tiny VAE's step 5-20x longer on 2 threads than on 1. On an idle machine
2 threads would be up to ~2x faster than 1 (the SD VAE forward: 2.4 s on 2 threads vs 4.7 s on 1).

FLOPs of one plain step (forward + backward, LPIPS included) are counted with
`torch.utils.flop_counter.FlopCounterMode` on the plain variant's (untimed) warm-up step and divided by its
median step time; the CPU's matmul FLOP/s is the best of a few large fp32 `torch.mm` (2048x2048), measured
in this run before and after the variants (the better of the two counts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "plain fp32": dict(trainable="all"),
    "channels_last": dict(trainable="all", channels_last=True),
    "grad checkpointing": dict(trainable="all", checkpointing=True),
    "decoder-only": dict(trainable="decoder"),
    "decoder-only + cache": dict(trainable="decoder", cached=True),
    "bf16 autocast": dict(trainable="all", bf16=True),
}
# The fundus article's VAE trainer, measured on the development machine (2 cores, fp32): images/s, process peak GB.
ARTICLE = {("tiny066", 64, 8): (29.0, 1.29), ("sd", 128, 2): (0.616, 3.4), ("sd", 256, 1): (0.136, 4.5),
           ("sd", 512, 1): (0.027, 11.3)}
SDNB_WEIGHTS = dict(mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=1e-6)  # VAE_RECIPES["sdnb"]


def build_vae(model: str):
    """A randomly initialised (seeded) `AutoencoderKL` of the named architecture."""
    import torch
    from diffusers import AutoencoderKL

    if model == "tiny":
        from sdnb.demo.models import tiny_vae
        return tiny_vae(0)
    torch.manual_seed(0)
    if model == "tiny066":
        return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    if model == "sd":  # SD v1's vae/config.json
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                             layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                             act_fn="silu", scaling_factor=0.18215)
    raise ValueError(f"--models: unknown model {model!r} (expected tiny, tiny066 or sd)")


def retina_crops(n: int, size: int, seed: int = 0):
    """n random size x size crops of scikit-image's retina photograph, (n, 3, size, size) in [-1, 1]."""
    import numpy as np
    import torch
    from skimage import data

    retina = data.retina()
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, retina.shape[0] - size + 1), rng.integers(0, retina.shape[1] - size + 1)
        crops.append(torch.from_numpy(np.ascontiguousarray(retina[y:y + size, x:x + size])))
    return torch.stack(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def matmul_flops(n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """Best FLOP/s of an n x n `torch.mm` (fp32 unless `dtype`) on this CPU (2 n^3 FLOPs each)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so that it measures from now on (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak RSS in bytes since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def child(a: dict) -> None:
    """Train one variant for a few steps; print one JSON line with its numbers."""
    import psutil
    import torch

    torch.set_num_threads(a["threads"])
    from sdnb.metrics import LPIPS
    from sdnb.vae.data import PatchLatents
    from sdnb.vae.model import VAEWithPosterior, prepare_for_training, vae_loss

    v = VARIANTS[a["variant"]]
    vae = prepare_for_training(build_vae(a["model"]), v["trainable"], v.get("checkpointing", False))
    torch.manual_seed(1)
    lpips = LPIPS(pretrained_backbone=False)
    model = VAEWithPosterior(vae)
    batch, n_batches = a["batch"], 4
    pool = retina_crops(batch * n_batches, a["size"])
    fmt = torch.channels_last if v.get("channels_last") else torch.contiguous_format
    if v.get("channels_last"):
        vae.to(memory_format=fmt)
        lpips.to(memory_format=fmt)
    setup_start = time.perf_counter()
    if v.get("cached"):
        cache = PatchLatents(list(pool), vae, batch_size=batch)
        batches = [{k: torch.stack([cache[j][k] for j in range(i * batch, (i + 1) * batch)]) for k in ("images", "mean", "std")}
                   for i in range(n_batches)]
    else:
        batches = [pool[i * batch:(i + 1) * batch].contiguous(memory_format=fmt) for i in range(n_batches)]
    setup_s = time.perf_counter() - setup_start
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(v.get("bf16")))

    def step(b) -> None:
        with autocast:  # fp32 master weights; vae_loss computes the losses in fp32
            losses = vae_loss(model, b, lpips, **SDNB_WEIGHTS)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    import gc
    gc.collect()
    rss_before = psutil.Process().memory_info().rss  # model, LPIPS, data (and cache) in memory; no AdamW state yet
    load_start = os.getloadavg()[0]
    flops = None
    for i in range(max(a["warmup"], 1 if a["count_flops"] else 0)):  # untimed; FLOPs are counted on the first
        if i == 0 and a["count_flops"]:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step(batches[0])
            flops = counter.get_total_flops()
        else:
            step(batches[i % n_batches])
    reset = reset_peak_rss()  # the peak of the timed steps: AdamW state, weights, activations, gradients
    times = []
    for i in range(a["steps"]):
        start = time.perf_counter()
        step(batches[i % n_batches])
        times.append(time.perf_counter() - start)
    peak = peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"step_s": statistics.median(times), "times": times, "peak_gb": peak / 2**30,
                      "train_gb": (peak - rss_before) / 2**30, "before_gb": rss_before / 2**30, "setup_s": setup_s,
                      "flops": flops, "load": (load_start + os.getloadavg()[0]) / 2, "peak_reset": reset,
                      "n_params": sum(p.numel() for p in vae.parameters()),
                      "n_trainable": sum(p.numel() for p in params)}))


def run_child(args: dict) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{args['model']} {args['size']} px, {args['variant']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd", help="comma-separated: tiny, tiny066, sd")
    parser.add_argument("--tiny-size", type=int, default=64)
    parser.add_argument("--tiny-batch", type=int, default=8)
    parser.add_argument("--tiny-steps", type=int, default=10, help="timed steps per tiny variant")
    parser.add_argument("--sd-sizes", default="128:2", help="size:batch pairs for the SD VAE, e.g. 128:2,256:1")
    parser.add_argument("--sd-steps", type=int, default=1,
                        help="timed steps per SD VAE variant (~15 s each at 128 px batch 2 on 1 thread); 1 keeps the "
                        "default run near 5 min, 2-3 give steadier numbers")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW state, allocator)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the variants; the fastest round counts")
    parser.add_argument("--tiny-rounds", type=int, default=1, help="rounds for the tiny VAEs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see above for why 1 on this machine)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    import torch

    variants = [v.strip() for v in args.variants.split(",")]
    if variants[0] != "plain fp32" or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: expected 'plain fp32' first, then any of {', '.join(VARIANTS)}")
    configs = []
    for model in args.models.split(","):
        if model == "sd":
            for pair in args.sd_sizes.split(","):
                size, batch = (int(x) for x in pair.split(":"))
                configs.append(("sd", size, batch, args.sd_steps, args.threads))
        else:
            build_vae(model)  # fail early on a bad name
            configs.append((model, args.tiny_size, args.tiny_batch, args.tiny_steps, args.threads))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    mm_before = {}
    for threads in sorted({c[-1] for c in configs} | {os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        mm_before[threads] = matmul_flops()
        print(f"fp32 matmul (2048x2048 torch.mm, best of 5), {threads} thread(s): {mm_before[threads] / 1e9:.1f} GFLOP/s")
    print("step: VAEWithPosterior + vae_loss (sdnb weights, LPIPS alex random backbone) + backward + clip + AdamW")
    summary = []
    for model, size, batch, steps, threads in configs:
        best: dict[str, dict] = {}
        for _ in range(args.rounds if model == "sd" else args.tiny_rounds):
            for variant in variants:
                r = run_child(dict(model=model, size=size, batch=batch, steps=steps, warmup=args.warmup,
                                   variant=variant, threads=threads,
                                   count_flops=variant == "plain fp32" and variant not in best))
                if variant not in best or r["step_s"] < best[variant]["step_s"]:
                    r["flops"] = r["flops"] or best.get(variant, {}).get("flops")
                    best[variant] = r
        base = best["plain fp32"]
        print(f"\n{model} ({base['n_params'] / 1e6:.2f} M params), {size} px, batch {batch}, {threads} thread(s), "
              f"median of {steps} steps after {args.warmup} warm-up")
        print(f"{'variant':<22}{'s/step':>8}{'images/s':>10}{'ratio':>7}{'peak GB':>9}{'train GB':>10}{'ratio':>7}"
              f"{'setup s':>9}{'load':>6}")
        for variant in variants:
            r = best[variant]
            print(f"{variant:<22}{r['step_s']:>8.3f}{batch / r['step_s']:>10.3f}{base['step_s'] / r['step_s']:>6.2f}x"
                  f"{r['peak_gb']:>9.2f}{r['train_gb']:>10.3f}{r['train_gb'] / max(base['train_gb'], 1e-9):>6.2f}x"
                  f"{r['setup_s']:>9.2f}{r['load']:>6.1f}")
        print(f"plain step: {base['flops'] / 1e9:.1f} GFLOP counted (forward + backward, LPIPS included) in "
              f"{base['step_s']:.3f} s -> {base['flops'] / base['step_s'] / 1e9:.1f} GFLOP/s")
        ref = ARTICLE.get((model, size, batch))
        if ref:
            print(f"the fundus article's trainer, measured on the development machine: {ref[0]} images/s, {ref[1]} GB peak -> "
                  f"sdnb plain step {batch / base['step_s'] / ref[0]:.2f}x its speed, {base['peak_gb'] / ref[1]:.2f}x its "
                  f"peak memory; fastest variant {max(batch / r['step_s'] for r in best.values()) / ref[0]:.2f}x its speed")
        summary.append((model, size, batch, threads, base, ref, best))
    print()
    mm_best = {}
    for threads, before in mm_before.items():
        torch.set_num_threads(threads)
        after = matmul_flops()
        mm_best[threads] = max(before, after)
        print(f"fp32 matmul after the variants, {threads} thread(s): {after / 1e9:.1f} GFLOP/s (before: {before / 1e9:.1f})")
    bf16_mm = {}
    if "bf16 autocast" in variants:
        for threads in mm_before:
            torch.set_num_threads(threads)
            bf16_mm[threads] = matmul_flops(dtype=torch.bfloat16)
            print(f"bf16 matmul, {threads} thread(s): {bf16_mm[threads] / 1e9:.1f} GFLOP/s")
    print("achieved FLOP/s of the plain step against the best fp32 matmul FLOP/s of this run (same thread count); "
          "the counter counts convolutions, matmuls and attention, not GroupNorm/SiLU/elementwise work:")
    for model, size, batch, threads, base, ref, best in summary:
        achieved = base["flops"] / base["step_s"]
        line = (f"  {model} {size} px batch {batch}: {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / mm_best[threads]:.0f}% "
                f"of {mm_best[threads] / 1e9:.0f} GFLOP/s")
        if "bf16 autocast" in best:
            bf16 = base["flops"] / best["bf16 autocast"]["step_s"]
            line += (f"; bf16 autocast: {bf16 / 1e9:.1f} GFLOP/s = {100 * bf16 / bf16_mm[threads]:.0f}% of the bf16 "
                     f"matmul's {bf16_mm[threads] / 1e9:.0f}")
        if ref:  # the same step at the reference's speed would need this many FLOP/s
            implied = ref[0] / batch * base["flops"]
            top = max(mm_best.values())
            line += (f"; the article trainer's {ref[0]} images/s would mean {implied / 1e9:.0f} GFLOP/s for this math "
                     f"({100 * implied / top:.0f}% of the best matmul rate here, {top / 1e9:.0f} GFLOP/s)")
        print(line)
    print(f"load average now {os.getloadavg()[0]:.2f}; 'load' columns: 1-min load average during the variant "
          f"(this benchmark itself adds ~1-2)")


if __name__ == "__main__":
    main()
