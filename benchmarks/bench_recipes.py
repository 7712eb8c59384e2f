"""The three VAE recipes on the embedded default: held-out PSNR/SSIM/LPIPS before and after the same short fine-tune.

    python benchmarks/bench_recipes.py                          # 150 steps, patch 64, seed 0, all three recipes
    python benchmarks/bench_recipes.py --steps 60 --recipes sdnb,ft-mse
    python benchmarks/bench_recipes.py --assets /tmp/tiny --seeds 0,1,2   # reuse a built sdnb.tiny, average seeds

Each recipe (`sdnb.vae.VAE_RECIPES`, every value as the recipe sets it: trainable part, optimizer, lr, batch
and accumulation, loss weights, EMA, augmentation) fine-tunes the tiny SD's VAE (pre-trained on natural photos)
on random fundus patches through `sdnb.vae.finetune` - the notebook's code path - for the same number of
optimizer steps with the same seed. The held-out patches are the fixed set `prepare_data` cuts from the
fundus validation tiles (disjoint from the training tiles); `sdnb.vae.finetune.held_out_metrics` scores the base VAE and the
saved fine-tuned VAE (the EMA weights where the recipe keeps an EMA) on them.

LPIPS offline has a random AlexNet backbone. Training uses the one `finetune` builds; the held-out LPIPS
here is another random backbone (seeded separately), so a recipe is not scored by the very network it was
trained against. Read it as a rough perceptual distance, not as published LPIPS values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdnb.metrics import LPIPS
from sdnb.models import load_vae
from sdnb.vae import VAE_RECIPES, VAEConfig, finetune, prepare_data
from sdnb.vae.finetune import held_out_metrics as evaluate

EVAL_LPIPS_SEED = 12345
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


def run_recipe(assets, recipe: str, run_dir: Path, steps: int, patch: int, n_val: int, seed: int,
               lpips: LPIPS, lr: float | None) -> dict:
    """Fine-tune with one recipe; return held-out metrics before/after and the training seconds."""
    cfg = VAEConfig(run_dir=str(run_dir), image_dir=str(assets.fundus_train), val_image_dir=str(assets.fundus_val),
                    model_id=str(assets.sd), patch_size=patch, n_val_patches=n_val, max_steps=steps, recipe=recipe,
                    seed=seed, device="cpu", mixed_precision="no", checkpoint_every=0, checkpoint_minutes=0,
                    validate_every=0, log_every=10, **({"lr": lr} if lr else {}))
    data = prepare_data(cfg)
    before = evaluate(load_vae(cfg.model_id), data.val_patches, lpips)
    start = time.perf_counter()
    result = finetune(cfg, data.train_images, data.val_patches)
    seconds = time.perf_counter() - start
    after = evaluate(load_vae(str(result.final_dir)), data.val_patches, lpips)
    return {"before": before, "after": after, "seconds": seconds, "cfg": cfg}


def describe(cfg: VAEConfig) -> str:
    loss = " + ".join(f"{w:g}*{n}" for n, w in (("MSE", cfg.mse_weight), ("L1", cfg.l1_weight),
                                                 ("LPIPS", cfg.lpips_weight), ("KL", cfg.kl_weight)) if w)
    ema = f", EMA {cfg.ema_decay:g}" if cfg.ema else ""
    return (f"{cfg.trainable}, {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}x{cfg.grad_accum}, "
            f"{loss}{ema}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(VAE_RECIPES), help="comma-separated recipe names")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per recipe")
    parser.add_argument("--patch", type=int, default=64, help="patch size (px)")
    parser.add_argument("--val-patches", type=int, default=64, help="fixed held-out patches")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; metrics are averaged over them")
    parser.add_argument("--lr", type=float, help="override every recipe's learning rate (default: each recipe's own)")
    parser.add_argument("--assets", help="folder of a built sdnb.tiny (built there if missing; default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny VAE is fastest on 1)")
    args = parser.parse_args()
    from sdnb.demo import build

    torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",")]
    unknown = [r for r in recipes if r not in VAE_RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; expected some of {', '.join(VAE_RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        assets = build(args.assets or Path(tmp) / "assets", progress=False)
        print(f"tiny assets ready in {time.perf_counter() - start:.0f} s; {args.steps} steps, patch {args.patch}, "
              f"{args.val_patches} held-out patches, seeds {seeds}, {args.threads} thread(s), "
              f"load average {os.getloadavg()[0]:.2f}")
        torch.manual_seed(EVAL_LPIPS_SEED)
        lpips = LPIPS(pretrained_backbone=False)
        runs: dict[str, list[dict]] = {r: [] for r in recipes}
        for seed in seeds:
            for recipe in recipes:
                runs[recipe].append(run_recipe(assets, recipe, Path(tmp) / f"{recipe}-{seed}", args.steps, args.patch,
                                               args.val_patches, seed, lpips, args.lr))
    mean = {r: {when: {k: statistics.mean(x[when][k] for x in rs) for k in HIGHER_IS_BETTER} for when in ("before", "after")}
            for r, rs in runs.items()}
    base = mean[recipes[0]]["before"]
    print(f"\n{'':<16}{'PSNR dB':>9}{'dPSNR':>8}{'SSIM':>8}{'dSSIM':>8}{'LPIPS*':>8}{'dLPIPS':>8}{'fit s':>9}  recipe")
    print(f"{'base VAE':<16}{base['psnr']:>9.2f}{'':>8}{base['ssim']:>8.4f}{'':>8}{base['lpips']:>8.4f}")
    for r in recipes:
        a, b = mean[r]["after"], mean[r]["before"]
        secs = statistics.mean(x["seconds"] for x in runs[r])
        print(f"{r:<16}{a['psnr']:>9.2f}{a['psnr'] - b['psnr']:>+8.2f}{a['ssim']:>8.4f}{a['ssim'] - b['ssim']:>+8.4f}"
              f"{a['lpips']:>8.4f}{a['lpips'] - b['lpips']:>+8.4f}{secs:>9.1f}  {describe(runs[r][0]['cfg'])}")
    if len(seeds) > 1:
        print("per seed (PSNR / SSIM / LPIPS after):")
        for r in recipes:
            print(f"  {r:<14} " + "; ".join(f"{x['after']['psnr']:.2f} / {x['after']['ssim']:.4f} / {x['after']['lpips']:.4f}"
                                             for x in runs[r]))
    print("* LPIPS (alex, random backbone), seeded apart from the training LPIPS; lower is better. "
          "fit s: wall time of finetune (setup, training, final save)")
    wins = {r: 0 for r in recipes}
    for k, higher in HIGHER_IS_BETTER.items():
        best = (max if higher else min)(recipes, key=lambda r: mean[r]["after"][k])
        wins[best] += 1
        print(f"best {k}: {best}")
    top = max(wins.values())
    winners = [r for r, w in wins.items() if w == top]
    print(f"winner on the held-out numbers (most metrics best): {', '.join(winners)} ({top} of 3)")


if __name__ == "__main__":
    main()
