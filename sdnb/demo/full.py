"""`make test-full`: the four notebooks on models of the real shapes (random SD v1.5, BLIP-base, CLIP ViT-L/14 from
`python -m sdnb.tiny DIR --full-size`) at tiny resolution and few steps, resumes included, with what each run cost.

    python -m sdnb.demo.full --assets /work/fullsize-assets --out runs/full     # ~15 GB of RAM at the peak (03)
    python -m sdnb.demo.full --tiny --out runs/full-tiny                        # the same runs on the tiny models

Each run's wall time, peak memory (this process and the notebook kernel, sampled), and the size of its newest
checkpoint and of its final/ folder go to OUT/table.md and are printed.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from sdnb.demo.fullsize import build_full
from sdnb.demo.run import REPO_NOTEBOOKS, run_notebook
from sdnb.demo.tiny import TinyAssets, build

GB = 1024 ** 3
# Free memory a full-size run needs before it starts (CPU, fp32): 03 holds the UNet, its gradients and AdamW's two
# moments (4 x 3.4 GB) besides the text encoder and VAE; 04 two pipelines, CLIP ViT-L/14 and three VAEs.
FULL_NEED_GB = {"01_captioning": 3, "02_vae_finetune": 4, "03_sd_finetune": 16, "04_compare": 12}
COMMON = dict(device="cpu", mixed_precision="no", seed=0, sync_dir="")


def full_runs(assets: TinyAssets, out: str | Path) -> list[tuple[str, str, dict]]:
    """(label, notebook, parameters) of every run, in order: VAE patches 64 px and SD 64 px, 3 steps then a resume
    to 4; 04 with its defaults' form (the 02 and 03 runs' final/ folders)."""
    out = Path(out)
    run = {name: str(out / name) for name in ("01_captioning", "02_vae_finetune", "03_sd_finetune", "04_compare")}
    p01 = dict(COMMON, run_dir=run["01_captioning"], image_dir=str(assets.photos), captioner_id=str(assets.blip),
               batch_size=2, num_beams=2, min_length=5, max_length=12, sweep_images=2,
               sweep_grid={"num_beams": [1, 2]})
    p02 = dict(COMMON, run_dir=run["02_vae_finetune"], image_dir=str(assets.fundus_train),
               val_image_dir=str(assets.fundus_val), model_id=str(assets.sd), patch_size=64, patches_per_epoch=16,
               n_val_patches=4, batch_size=2, max_steps=3, checkpoint_every=2, validate_every=0, log_every=1,
               tile_size=256, fid_features="fid-helper", n_bootstrap=10)
    p03 = dict(COMMON, run_dir=run["03_sd_finetune"], data_dir=str(Path(run["01_captioning"]) / "train"),
               model_id=str(assets.sd), resolution=64, max_steps=3, batch_size=1, checkpoint_every=2,
               validate_every=2, log_every=1, sample_steps=2, sample_cfg_scales=[7.0],
               sample_prompts=["a photograph of a mountain lake", "a dog running on a beach"])
    p04 = dict(COMMON, run_dir=run["04_compare"], base_vae=str(assets.sd), finetuned_vae=str(Path(run["02_vae_finetune"]) / "final"),
               image_dir=str(assets.fundus_val), patch_size=64, n_patches=4, n_full_images=1, tile_size=256,
               base_model_id=str(assets.sd), finetuned_model=str(Path(run["03_sd_finetune"]) / "final"),
               n_images=2, resolution=64, num_inference_steps=2, batch_size=2, fid_features="fid-helper",
               xyz_axes={"cfg": [1.0, 7.0], "checkpoint": ["base", "finetuned"]}, clip_model_id=str(assets.clip),
               n_clusters=2, n_bootstrap=10)
    return [("01_captioning", "01_captioning", p01),
            ("02_vae_finetune", "02_vae_finetune", p02),
            ("02_vae_finetune resume +1", "02_vae_finetune", dict(p02, max_steps=4, resume="latest")),
            ("03_sd_finetune", "03_sd_finetune", p03),
            ("03_sd_finetune resume +1", "03_sd_finetune", dict(p03, max_steps=4, resume="latest")),
            ("04_compare", "04_compare", p04)]


class PeakMemory:
    """The highest total resident memory of this process and all its descendants (the notebook kernel), sampled
    every `interval` seconds in a thread while in the `with` block."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a process that just ended
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if it is not there)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@dataclass
class RunCost:
    """What one notebook run cost."""

    label: str
    wall_s: float
    peak_gb: float
    checkpoint_gb: float
    final_gb: float
    error: str = ""


def measure(label: str, notebook: str, params: dict, out: Path, notebooks: Path) -> RunCost:
    """Run one notebook under `PeakMemory`; the size of its newest checkpoint and of its final/ (01: its train/)."""
    start, error = time.perf_counter(), ""
    with PeakMemory() as mem:
        try:
            run_notebook(notebook, out, params, notebooks)
        except Exception as err:  # noqa: BLE001 (a dead kernel, out of memory, a failing cell: recorded, not fatal)
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"[:200]
    run_dir = Path(params["run_dir"])
    checkpoints = sorted((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else []
    final = run_dir / ("train" if notebook == "01_captioning" else "final")
    return RunCost(label, time.perf_counter() - start, mem.peak / GB,
                   folder_bytes(checkpoints[-1]) / GB if checkpoints else 0.0, folder_bytes(final) / GB, error)


def table(costs: list[RunCost], title: str) -> str:
    """The costs as a Markdown table."""
    lines = [f"### {title}", "", "| run | wall s | peak RAM GB | checkpoint GB | final GB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {c.label}{' FAILED' if c.error else ''} | {c.wall_s:.0f} | {c.peak_gb:.1f} | {c.checkpoint_gb:.3f} | "
              f"{c.final_gb:.3f} |" for c in costs]
    lines += [f"\n{c.label} failed: {c.error}" for c in costs if c.error]
    return "\n".join(lines) + "\n"


def wait_for_memory(need_gb: float, wait_s: float) -> str:
    """'' once `need_gb` of memory is available (checked every 10 s for up to `wait_s`), else why not: on a shared
    machine a run that cannot fit is skipped rather than left to the OOM killer."""
    deadline = time.monotonic() + wait_s
    while (free := psutil.virtual_memory().available / GB) < need_gb:
        if time.monotonic() > deadline:
            return f"skipped: needs ~{need_gb:.0f} GB of free memory, {free:.1f} GB available"
        time.sleep(10)
    return ""


def run_all(assets: TinyAssets, out: str | Path, title: str, notebooks: Path = REPO_NOTEBOOKS,
            need_gb: dict[str, float] | None = None, wait_s: float = 0) -> list[RunCost]:
    """Every run of `full_runs` in a fresh OUT (previous results there are removed); the table to OUT/table.md.
    `need_gb`: free memory each notebook needs before it starts (waiting up to `wait_s` for it)."""
    out = Path(out)
    for name in ("01_captioning", "02_vae_finetune", "03_sd_finetune", "04_compare", "notebooks"):
        shutil.rmtree(out / name, ignore_errors=True)
    costs = []
    for label, notebook, params in full_runs(assets, out):
        print(f"running {label} ...", flush=True)
        skip = wait_for_memory((need_gb or {}).get(notebook, 0), wait_s)
        costs.append(RunCost(label, 0, 0, 0, 0, skip) if skip else measure(label, notebook, params, out, notebooks))
        c = costs[-1]
        print(f"  {c.wall_s:.0f} s, peak {c.peak_gb:.1f} GB, checkpoint {c.checkpoint_gb:.2f} GB, "
              f"final {c.final_gb:.2f} GB{'; FAILED: ' + c.error if c.error else ''}", flush=True)
        (out / "table.md").write_text(table(costs, title))
    print(table(costs, title))
    return costs


def main(argv: list[str] | None = None) -> list[RunCost]:
    parser = argparse.ArgumentParser(prog="python -m sdnb.demo.full", description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default="runs/full-assets", help="the --full-size build (written if missing)")
    parser.add_argument("--out", default="runs/full", help="folder for the runs and table.md")
    parser.add_argument("--tiny", action="store_true", help="the same runs on the tiny models (quick)")
    parser.add_argument("--wait-min", type=float, default=30, help="minutes to wait for free memory before a run "
                        "(a shared machine), then skip it (default 30)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.tiny:
        assets, title = build(out / "assets"), "tiny models"
        return run_all(assets, out, title)
    assets = build_full(args.assets)
    title = "full-size shapes (SD v1.5, BLIP-base, CLIP ViT-L/14), random weights, CPU fp32"
    return run_all(assets, out, title, need_gb=FULL_NEED_GB, wait_s=args.wait_min * 60)


if __name__ == "__main__":
    raise SystemExit(1 if any(c.error for c in main()) else 0)
