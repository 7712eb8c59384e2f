"""Sharing a run on the Hugging Face Hub: `final/` of a 02 or 03 run, with a model card (README.md) stating the base
model, the data, the recipe, the steps and the held-out numbers (the run's own metrics.json, and 04's when a 04 run
compared this run).

    python -m sdnb.hub RUN_DIR OWNER/NAME [--compare runs/04_compare] [--public]

`prepare_upload` writes the upload folder (run_dir/hub: the card and hard links to final/'s files) and nothing
else; `push_to_hub` then creates the repository (private by default) and uploads that folder. The card's metadata
follows the Hub's model card fields (huggingface_hub's `ModelCardData`: base_model, library_name, pipeline_tag,
tags; `base_model_relation: adapter` for a LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData, get_token

from sdnb.models import LORA_META, RUN_META, is_hub_id
from sdnb.stats import tables
from sdnb.train.logs import read_log

RECIPE = {"vae": ("recipe", "trainable", "optimizer", "lr", "batch_size", "grad_accum", "patch_size", "mse_weight",
                  "l1_weight", "lpips_weight", "kl_weight", "ema", "ema_decay", "mixed_precision", "seed"),
          "sd": ("lora_rank", "lora_alpha", "train_text_encoder", "optimizer", "lr", "lr_scheduler", "batch_size",
                 "grad_accum", "resolution", "crop_jitter", "flip", "caption_dropout", "snr_gamma", "noise_offset",
                 "ema", "mixed_precision", "seed")}


def _compared(compare_dir: Path, run_dir: Path) -> Path | None:
    """04's metrics.json when that 04 run compared this run (its finetuned_model / finetuned_vae point here)."""
    try:
        config = json.loads((compare_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    here = {run_dir.resolve(), (run_dir / "final").resolve()}
    refs = [config.get("finetuned_model", ""), config.get("finetuned_vae", "")]
    found = any(r and Path(r).resolve() in here for r in refs)
    return compare_dir / "metrics.json" if found and (compare_dir / "metrics.json").is_file() else None


def _markdown(section: dict) -> list[str]:
    """A metrics section (`sdnb.stats` schema) as markdown tables."""
    lines = [section["description"], ""] if section.get("description") else []
    for t in tables(section):
        lines += [f"*{t.title}*", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t.rows] + [""]
    return lines + ([f"In words: {section['verdict']}", ""] if section.get("verdict") else [])


def _numbers(run_dir: Path, compare_dir: str | Path) -> list[str]:
    """The card's "Held-out numbers": the run's metrics.json sections, then 04's."""
    lines = []
    own = run_dir / "metrics.json"
    sources = [("this run", own)] if own.is_file() else []
    found = _compared(Path(compare_dir) if compare_dir else run_dir.parent / "04_compare", run_dir)
    sources += [("04_compare", found)] if found else []
    for label, path in sources:
        data = json.loads(path.read_text())
        for name, section in data.items():
            if name == "training":
                kept = {k: v for k, v in section.items() if v is not None and k != "best_weights"}
                lines += [f"**Training ({label})**: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                                  for k, v in kept.items()), ""]
            elif isinstance(section, dict) and section.get("models"):
                lines += [f"**{name.upper()} comparison ({label})**", ""] + _markdown(section)
    return lines or ["No held-out numbers yet: run 04_compare on this run, then push again."]


def model_card(run_dir: str | Path, repo_id: str, compare_dir: str | Path = "") -> str:
    """The README.md of the Hub repository: metadata, what the model is, how to load it, how it was made and measured."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    stage, lora = config.get("stage"), (run_dir / "final" / LORA_META).is_file()
    base = config.get("model_id", "")
    steps = max((int(r["step"]) for r in read_log(run_dir / "log.csv")), default=0)
    kind = "a LoRA adapter for" if lora else "a fine-tuned VAE of" if stage == "vae" else "a fine-tune of"
    meta = ModelCardData(base_model=base if is_hub_id(base) else None, library_name="diffusers",
                         pipeline_tag=None if stage == "vae" else "text-to-image",
                         tags=["stable-diffusion", "sdnb"] + (["lora"] if lora else ["vae"] if stage == "vae" else []),
                         **({"base_model_relation": "adapter"} if lora else {}))
    data = "/".join(Path(config.get("image_dir") or config.get("data_dir") or "unknown").parts[-2:])  # no local path
    usage = {True: f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{repo_id}")',
             False: f'vae = AutoencoderKL.from_pretrained("{repo_id}")' if stage == "vae"
             else f'pipe = StableDiffusionPipeline.from_pretrained("{repo_id}")'}[lora]
    lines = ["---", meta.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", "",
             f"{kind[0].upper()}{kind[1:]} `{base}`, trained with sdnb for {steps} steps on the images "
             f"of `{data}`.", "", "## Use", "", "```python", "from diffusers import AutoencoderKL, StableDiffusionPipeline",
             usage, "```", "", "## Recipe", ""]
    lines += [f"- {k}: {config[k]}" for k in RECIPE.get(stage, ()) if k in config] + [f"- steps: {steps}", ""]
    return "\n".join(lines + ["## Held-out numbers", ""] + _numbers(run_dir, compare_dir)) + "\n"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of gigabytes of weights
    except OSError:
        shutil.copy2(src, dst)


def prepare_upload(run_dir: str | Path, repo_id: str, compare_dir: str | Path = "") -> Path:
    """Write run_dir/hub: final/'s files (linked) without sdnb's local bookkeeping, and README.md (the card)."""
    run_dir = Path(run_dir)
    final, out = run_dir / "final", run_dir / "hub"
    if not final.is_dir():
        raise FileNotFoundError(f"{final}: no final/ to upload; the run has not finished")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(final, out, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(LORA_META, RUN_META))
    (out / "README.md").write_text(model_card(run_dir, repo_id, compare_dir))
    return out


def push_to_hub(run_dir: str | Path, repo_id: str, private: bool = True, compare_dir: str | Path = "") -> str:
    """Create `repo_id` (if needed) and upload the run's upload folder; returns the repository's URL."""
    folder = prepare_upload(run_dir, repo_id, compare_dir)
    if not get_token():
        raise PermissionError(f"hub_repo_id={repo_id!r}: not logged in to the Hugging Face Hub. Make a write token at "
                              "https://huggingface.co/settings/tokens, then in Colab add it as the secret HF_TOKEN (or run "
                              "`from huggingface_hub import notebook_login; notebook_login()`) and run this cell again. "
                              f"The upload folder is ready: {folder}")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"sdnb: upload {Path(run_dir).name}")
    return str(url)


def main(argv: list[str] | None = None) -> None:
    """`python -m sdnb.hub RUN_DIR OWNER/NAME [--compare DIR] [--public] [--dry-run]`."""
    parser = argparse.ArgumentParser(prog="python -m sdnb.hub", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--compare", default="", help="the 04_compare run folder (default: beside RUN_DIR)")
    parser.add_argument("--public", action="store_true", help="create a public repository (default: private)")
    parser.add_argument("--dry-run", action="store_true", help="write RUN_DIR/hub and its README.md only")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(f"upload folder: {prepare_upload(args.run_dir, args.repo_id, args.compare)}")
    else:
        print(f"uploaded: {push_to_hub(args.run_dir, args.repo_id, not args.public, args.compare)}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, PermissionError) as err:  # a message, not a traceback
        raise SystemExit(f"error: {err}") from None
