"""Captioning throughput on the tiny BLIP: images/s batched vs one image at a time, and their ratio.

    python benchmarks/bench_caption.py [--images 16] [--batch-size 8] [--threads 1]
    python benchmarks/bench_caption.py --blip path/to/blip --photos path/to/photos   # skip building the tiny assets

Both runs caption the same images with the same settings; the captions must come out the same.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sdnb.caption import load_captioner
from sdnb.data.images import load_rgb, scan


def images_per_second(captioner, images, batch_size: int, **gen) -> tuple[float, list[str]]:
    """Caption ``images`` in batches of ``batch_size``; return (images/s, captions)."""
    captions: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        captions += captioner.caption(images[i:i + batch_size], **gen)
    return len(images) / (time.perf_counter() - start), captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blip", help="a BLIP folder or hub id (default: the tiny BLIP, built offline)")
    parser.add_argument("--photos", help="folder of photos (default: the embedded sample photos)")
    parser.add_argument("--images", type=int, default=16, help="images captioned per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave as is)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        blip, photos = args.blip, args.photos
        if blip is None or photos is None:
            from sdnb.demo import build

            assets = build(Path(tmp) / "tiny", progress=False)
            blip, photos = blip or assets.blip, photos or assets.photos
        captioner = load_captioner(blip, args.device)
        found = [load_rgb(r.path) for r in scan(photos, progress=False).ok]
        images = [found[i % len(found)] for i in range(args.images)]
        gen = dict(num_beams=args.num_beams, min_length=5, max_length=args.max_length)
        captioner.caption(images[:2], **gen)  # warm-up

        single, one_by_one = images_per_second(captioner, images, 1, **gen)
        batched, in_batches = images_per_second(captioner, images, args.batch_size, **gen)

    print(f"captioning {args.images} images on {args.device} ({torch.get_num_threads()} threads), "
          f"{args.num_beams} beams, up to {args.max_length} tokens, model {blip}")
    print(f"  one at a time   : {single:7.2f} images/s")
    print(f"  batches of {args.batch_size:<4} : {batched:7.2f} images/s")
    print(f"  ratio batched / one at a time: {batched / single:.2f}x; same captions: {one_by_one == in_batches}")


if __name__ == "__main__":
    main()
