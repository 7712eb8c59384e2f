"""LoRA vs full fine-tuning of the UNet at the same settings: speed, memory, trainable parameters, checkpoint size.

    python benchmarks/bench_lora.py                         # builds the tiny SD (sdnb.tiny), 64 and 256 px, batch 2
    python benchmarks/bench_lora.py --sd path/to/pipeline --sizes 512 --steps 20 --ranks 4,64

Each variant trains in its own process through `sdnb.sd.finetune` (the shared loop, aspect buckets, no validation,
no samples, one checkpoint at the end), so its peak memory is its own: on a CUDA GPU torch's peak allocation, else
the peak RSS above the RSS with the models loaded ("training GB"). Steps/s come from the loop's log.csv (elapsed time
between the 3rd and the last step). Rounds alternate the variants so that a busy machine slows all alike; the best
round counts. Every ratio is against the full fine-tune measured in the same run.

The last table is arithmetic, not a measurement: SD 1.5's UNet built on the meta device (no memory), its trainable
parameters under each variant and the bytes of weights + gradients + AdamW state they need in fp32 (4 + 4 + 8 bytes
per trainable parameter; the frozen UNet in fp16 under LoRA as diffusers' recipe keeps it).
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

from bench_sd import captioned_copies  # benchmarks/ is the script's folder


def child(args: dict) -> None:
    """Train one variant and print a JSON line with its numbers."""
    import torch

    torch.set_num_threads(args["threads"])
    from sdnb.data import read_captions
    from sdnb.sd import SDConfig, build_datasets, finetune, load_parts
    from sdnb.train import read_log

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SDConfig(run_dir=args["run_dir"], data_dir=args["data"], model_id=args["sd"], device=device,
                   mixed_precision="fp16" if device == "cuda" else "no", resolution=args["size"], max_steps=args["steps"],
                   max_epochs=0, batch_size=2, lr=1e-4, log_every=1, validate_every=0, checkpoint_every=args["steps"],
                   checkpoint_minutes=0, sample_prompts=[], val_fraction=0.0, crop_jitter=0.0, flip=False,
                   gradient_checkpointing=False, save_best=False, lora_rank=args["rank"])
    parts = load_parts(cfg.model_id)
    records = read_captions(cfg.data_dir, progress=False)
    rss_loaded = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    finetune(cfg, parts, *build_datasets(cfg, records, []))
    total = time.perf_counter() - start
    rows = [r for r in read_log(Path(cfg.run_dir) / "log.csv") if "loss" in r]
    warm = rows[2]
    per_step = (rows[-1]["elapsed_s"] - warm["elapsed_s"]) / (rows[-1]["step"] - warm["step"])
    checkpoint = Path(cfg.run_dir) / "checkpoints" / f"step-{args['steps']:06d}"
    trainable = sum(p.numel() for p in parts.unet.parameters() if p.requires_grad)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_loaded) / 2**30
    print(json.dumps({"steps_per_s": 1 / per_step, "setup_s": total - rows[-1]["elapsed_s"], "training_gb": peak,
                      "trainable": trainable, "device": device,
                      "checkpoint_mb": sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 2**20}))


def run_variant(sd: Path, data: Path, size: int, steps: int, rank: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = dict(sd=str(sd), data=str(data), size=size, steps=steps, rank=rank, threads=threads,
                    run_dir=str(Path(tmp) / "run"))
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"lora_rank={rank} at {size} px failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def sd15_arithmetic(ranks: list[int]) -> None:
    """Trainable parameters and fp32 training state of SD 1.5's UNet (built on the meta device) per variant."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdnb.lora import estimate_lora_parameters

    with torch.device("meta"):  # SD 1.5's UNet config (runwayml/stable-diffusion-v1-5 unet/config.json)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    total = sum(p.numel() for p in unet.parameters())
    print(f"\nSD 1.5 UNet, arithmetic: {total / 1e6:.1f} M parameters")
    print("variant        trainable M   weights+grads+AdamW GiB   frozen UNet GiB   ratio of the sum")
    full = total * 16 / 2**30
    print(f"full           {total / 1e6:11.1f}   {full:23.2f}   {0:15.2f}   1.00x")
    for rank in ranks:
        n = estimate_lora_parameters(unet, rank)
        state, frozen = n * 16 / 2**30, total * 2 / 2**30
        print(f"LoRA rank {rank:<4} {n / 1e6:11.2f}   {state:23.3f}   {frozen:15.2f}   {(state + frozen) / full:4.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", help="a diffusers SD pipeline folder (default: build the tiny SD)")
    parser.add_argument("--photos", help="images to caption-copy (default: the tiny assets' photos)")
    parser.add_argument("--sizes", default="64,256", help="training resolutions, comma-separated")
    parser.add_argument("--ranks", default="4,32", help="LoRA ranks compared with the full fine-tune")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    ranks = [int(r) for r in args.ranks.split(",")]
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
                for rank in [0, *ranks]:
                    result = run_variant(Path(sd), data, size, args.steps, rank, args.threads)
                    if rank not in best or result["steps_per_s"] > best[rank]["steps_per_s"]:
                        best[rank] = result
            base = best[0]
            print(f"\n{size} px ({base['device']})  trainable  steps/s  ratio  training GB  ratio  checkpoint MB  ratio")
            for rank in [0, *ranks]:
                r = best[rank]
                print(f"{'full' if rank == 0 else f'LoRA rank {rank}':<14} {r['trainable']:9,}  {r['steps_per_s']:7.2f}"
                      f"  {r['steps_per_s'] / base['steps_per_s']:4.2f}x  {r['training_gb']:11.3f}"
                      f"  {r['training_gb'] / max(base['training_gb'], 1e-9):4.2f}x  {r['checkpoint_mb']:13.2f}"
                      f"  {r['checkpoint_mb'] / base['checkpoint_mb']:5.3f}x")
    sd15_arithmetic(ranks)


if __name__ == "__main__":
    main()
