"""The control of 02: a VAE trained with the same recipe, steps and seed on other images (e.g. natural photos), and
measured on the same held-out domain images as the fine-tuned one.

Any fine-tuning is also more training: a base VAE that was itself trained briefly (the embedded default's is) or
stopped early gains from more steps on any images. A control separates the two: only if the fine-tuned VAE beats a
VAE trained as long on other images does its gain come from the domain data. `verdict` says which, in words, from the
intervals of the paired per-image differences that `compare_vaes` measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from sdnb.config import ConfigError
from sdnb.data.images import find_images
from sdnb.stats import HIGHER_IS_BETTER, NAMES
from sdnb.vae.config import VAEConfig
from sdnb.vae.data import DecodedImages, VAEData

CONTROL_DIR = "control"  # the control run's folder inside the fine-tuned run's run_dir (and sync_dir)
PRIMARY = ("psnr", "lpips")  # the metrics a verdict rests on: pixel fidelity and perceptual distance
UNITS = {"psnr": " dB"}


def control_config(cfg: VAEConfig) -> VAEConfig:
    """The control run of a 02 config: the same recipe, steps, seed and held-out images, trained on
    `control_image_dir`, in its own run_dir (`run_dir/control`) and sync_dir (`sync_dir/control`), without export or
    Hub push. Saved as its own config.json, so its resume is checked like any run's; a `resume` naming one of the
    tuned run's checkpoints resumes the control from its latest."""
    if not cfg.control_image_dir:
        raise ConfigError("control_image_dir='' names no images to train a control on: set it to a folder of other "
                          "images (e.g. natural photos), or skip the control")
    sync_dir = str(Path(cfg.sync_dir) / CONTROL_DIR) if cfg.sync_dir else ""
    resume = cfg.resume if cfg.resume in ("", "latest") else "latest"  # a checkpoint folder of the tuned run's: not its
    return dataclasses.replace(cfg, run_dir=str(cfg.path / CONTROL_DIR), sync_dir=sync_dir, resume=resume,
                               is_control=True, export_single_file=False, hub_repo_id="")


def control_data(cfg: VAEConfig, data: VAEData) -> VAEData:
    """The control run's data: every image of `control_image_dir` to train on (decoded into the control's own cache),
    and the held-out images and patches of `data`, the fine-tuned run's."""
    paths = [r.path for r in find_images(cfg.control_image_dir, "control_image_dir", cfg.path / "skipped.csv")]
    return dataclasses.replace(
        data, train_paths=paths, train_images=DecodedImages(paths, cfg.path / "cache", min_side=cfg.patch_size),
        description=f"control: {len(paths)} training images in {cfg.control_image_dir}; held out: {data.description}")


def control_run(finetuned: str, control: str) -> str:
    """What 04's `control_vae` names: 'auto' = the control run beside a 02 run `finetuned` (its `control/` folder) if
    one finished there, else '' (none, with a printed note); anything else is returned as it is."""
    if control != "auto":
        return control
    run = Path(finetuned).parent if Path(finetuned).name == "final" else Path(finetuned)
    if finetuned and (run / CONTROL_DIR / "final").is_dir():
        print(f"control_vae='auto': the control run {run / CONTROL_DIR}")
        return str(run / CONTROL_DIR)
    print(f"control_vae='auto': no control run in {run / CONTROL_DIR} (02 with control_image_dir set trains one), so "
          "no control: a gain over the base may be just more training")
    return ""


def _differs(entry: Mapping, metric: str) -> int | None:
    """+1 when the interval of a paired difference (first - second) lies wholly on the first model's better side, -1
    on its worse side, 0 when it includes 0; None without an interval."""
    if not entry.get("ci95"):
        return None
    lo, hi = entry["ci95"]
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    if lo > 0 or hi < 0:
        return sign if lo > 0 else -sign
    return 0


def _numbers(metrics: Mapping, pair: str, metric: str) -> str:
    d, w = metrics["difference"][pair][metric], metrics["wins"][pair][metric]
    ci = f", 95% CI {d['ci95'][0]:+.3g} to {d['ci95'][1]:+.3g}" if d.get("ci95") else ""
    return f"{NAMES[metric]} {d['value']:+.3g}{UNITS.get(metric, '')}{ci}, better on {w['value']:.0%} of images"


def _compared(metrics: Mapping, a: str, b: str) -> tuple[str, list[int | None]]:
    pair = f"{a} vs {b}"
    signs = [_differs(metrics["difference"][pair][m], m) for m in PRIMARY]
    return f"{a} vs {b} ({'; '.join(_numbers(metrics, pair, m) for m in PRIMARY)})", signs


def verdict(metrics: Mapping, names: list[str]) -> str:
    """In words, from `compare_vaes`' metrics: does the fine-tuned VAE (names[1]) beat the base (names[0]), and,
    with a control (names[2]), does it beat the control, i.e. does its gain come from the domain data? Decided from
    the 95% intervals of the paired per-image differences in PSNR and LPIPS (better on both = beats)."""
    if len(names) < 2 or "difference" not in metrics:
        return ""
    base, tuned, n = names[0], names[1], metrics.get("n_images", "?")
    text, signs = _compared(metrics, tuned, base)
    if None in signs:
        return f"{text}: no intervals (n_bootstrap = 0), so these {n} images cannot say whether anything changed."
    gain = all(s == 1 for s in signs)
    out = f"{text}: the {tuned} VAE {'beats' if gain else 'does not clearly beat'} the {base} on {n} held-out images."
    if len(names) < 3:
        return out + (" No control was compared: part of a gain over the base may be just more training (02's "
                      "control_image_dir trains a control).")
    return f"{out} {_control_sentence(metrics, base, tuned, names[2], gain)}"


def _control_sentence(metrics: Mapping, base: str, tuned: str, control: str, gain: bool) -> str:
    """Fine-tuned vs control, in numbers and words: where the gain over the base comes from."""
    text, signs = _compared(metrics, tuned, control)
    better = [NAMES[m] for m, s in zip(PRIMARY, signs) if s == 1]
    worse = [NAMES[m] for m, s in zip(PRIMARY, signs) if s == -1]
    same = f"the {control} (the same recipe and steps on other images)"
    if not gain:
        why = f"without a clear gain over the {base}, there is no gain to trace to the domain data"
    elif worse:
        why = f"{same} is better on {' and '.join(worse)}: the gain over the {base} is more training, not the domain data"
    elif len(better) == len(PRIMARY):
        why = (f"the {tuned} VAE beats {same} on both: the gain over the {base} comes from the domain data, not just "
               "from more training")
    elif better:
        rest = " and ".join(NAMES[m] for m in PRIMARY if NAMES[m] not in better)
        why = (f"the {tuned} VAE beats {same} on {' and '.join(better)} only ({rest}: the interval includes 0): the "
               f"domain data adds to {' and '.join(better)}; on {rest} the gain over the {base} may be just more "
               "training")
    else:
        why = (f"the intervals include 0, so the {tuned} VAE does not beat {same}: its gain over the {base} may be "
               f"mostly more training, not the domain data (or {metrics.get('n_images', '?')} images are too few "
               "to tell)")
    return f"{text[0].upper()}{text[1:]}: {why}."
