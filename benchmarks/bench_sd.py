"""SD fine-tuning speed and memory on the tiny SD: latent caching and gradient checkpointing, on and off.

    python benchmarks/bench_sd.py                         # builds the tiny SD (sdnb.tiny), 64 and 256 px, batch 2
    python benchmarks/bench_sd.py --sd path/to/pipeline --photos path/to/images --sizes 64 --steps 40

Each variant trains in its own process through `sdnb.sd.finetune` (the shared loop, aspect buckets,
no validation, no samples, no checkpoints), so its peak memory (ru_maxrss) is its own; "training GB" is
that peak above the memory held once the models are loaded (imports alone take ~0.9 GB). Steps/s come
from the loop's log.csv (elapsed time between the 3rd and the last step: the caching pass and model
loading are not in it; they are in "setup s"). Rounds alternate the variants so that a busy machine
slows all alike; the best round counts. Ratios are printed against "no cache, no checkpointing".
For scale, measured on the development machine (2 cores, fp32): diffusers' train_text_to_image on a tiny SD ran
11.1 steps/s at 64 px (1.02 GB) and 0.22 steps/s at 256 px (1.7 GB), batch 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = [dict(cache_latents=False, gradient_checkpointing=False), dict(cache_latents=True, gradient_checkpointing=False),
            dict(cache_latents=False, gradient_checkpointing=True), dict(cache_latents=True, gradient_checkpointing=True)]
CAPTIONS = ["a red flower in a garden", "a cat on a sofa", "a rocket on a launch pad", "a cup of coffee",
            "galaxies in deep space", "a portrait of an astronaut", "a microscope image of tissue", "a colour wheel"]


def captioned_copies(photos: Path, out: Path, n: int = 8) -> Path:
    """n captioned images of mixed aspect ratios (1:1, 2:1, 1:2) cut from the photos, with .txt sidecars."""
    from sdnb.data.images import load_rgb, scan

    out.mkdir(parents=True, exist_ok=True)
    images = [load_rgb(r.path) for r in scan(photos, progress=False).ok]
    for i in range(n):
        image = images[i % len(images)]
        w, h = image.size
        image.crop([(0, 0, w, h), (0, 0, w, h // 2), (w // 2, 0, w, h)][i % 3]).save(out / f"img{i}.jpg", quality=92)
        (out / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return out


def child(args: dict) -> None:
    """Train one variant and print a JSON line with its numbers."""
    import torch

    torch.set_num_threads(args["threads"])
    from sdnb.data import read_captions
    from sdnb.sd import SDConfig, build_datasets, finetune, load_parts
    from sdnb.train import read_log

    cfg = SDConfig(run_dir=args["run_dir"], data_dir=args["data"], model_id=args["sd"], device="cpu", mixed_precision="no",
                   resolution=args["size"], max_steps=args["steps"], max_epochs=0, batch_size=2, lr=1e-5, log_every=1,
                   validate_every=0, checkpoint_every=0, checkpoint_minutes=0, sample_prompts=[], val_fraction=0.0,
                   crop_jitter=0.0, flip=False, **args["variant"])
    parts = load_parts(cfg.model_id)
    records = read_captions(cfg.data_dir, progress=False)
    rss_loaded = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    finetune(cfg, parts, *build_datasets(cfg, records, []))
    total = time.perf_counter() - start
    rows = [r for r in read_log(Path(cfg.run_dir) / "log.csv") if "loss" in r]
    warm = rows[2]
    per_step = (rows[-1]["elapsed_s"] - warm["elapsed_s"]) / (rows[-1]["step"] - warm["step"])
    print(json.dumps({"steps_per_s": 1 / per_step, "setup_s": total - rows[-1]["elapsed_s"],
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                      "loaded_gb": rss_loaded / 2**30}))


def run_variant(sd: Path, data: Path, size: int, steps: int, variant: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = dict(sd=str(sd), data=str(data), size=size, steps=steps, variant=variant, threads=threads,
                    run_dir=str(Path(tmp) / "run"))
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"variant {variant} at {size} px failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def name(variant: dict) -> str:
    return f"cache {'on ' if variant['cache_latents'] else 'off'}, grad ckpt {'on ' if variant['gradient_checkpointing'] else 'off'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", help="a diffusers SD pipeline folder (default: build the tiny SD)")
    parser.add_argument("--photos", help="images to caption-copy (default: the tiny assets' photos)")
    parser.add_argument("--sizes", default="64,256", help="training resolutions, comma-separated")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        sd, photos = args.sd, args.photos
        if not sd or not photos:
            from sdnb.demo import build

            assets = build(Path(tmp) / "assets", progress=False)
            sd, photos = sd or assets.sd, photos or assets.photos
        data = captioned_copies(Path(photos), Path(tmp) / "data")
        print(f"SD: {sd}; 8 captioned images, batch 2, {args.steps} steps, {args.threads} threads, best of {args.rounds}")
        for size in map(int, args.sizes.split(",")):
            best: dict[int, dict] = {}
            for _ in range(args.rounds):
                for i, variant in enumerate(VARIANTS):
                    result = run_variant(Path(sd), data, size, args.steps, variant, args.threads)
                    if i not in best or result["steps_per_s"] > best[i]["steps_per_s"]:
                        best[i] = result
            base = best[0]
            print(f"\n{size} px                  steps/s  ratio  peak GB  training GB  ratio  setup s")
            for i, variant in enumerate(VARIANTS):
                r = best[i]
                train, train0 = r["peak_gb"] - r["loaded_gb"], base["peak_gb"] - base["loaded_gb"]
                print(f"{name(variant)}  {r['steps_per_s']:9.2f}  {r['steps_per_s'] / base['steps_per_s']:4.2f}x"
                      f"  {r['peak_gb']:7.2f}  {train:11.3f}  {train / max(train0, 1e-9):4.2f}x  {r['setup_s']:7.1f}")
            print("(training GB: peak RSS above the RSS with the models loaded, before training)")


if __name__ == "__main__":
    main()
