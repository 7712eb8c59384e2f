"""04_compare, the SD side: the same prompts and seeds through the base and the fine-tuned pipeline.

Image i is generated from prompt i (prompts cycle) with seed `seed + i`, from a CPU generator per image,
so the two pipelines start from the same noise whatever the batch size or device. The numbers: FID and KID
against the training images, the distance to the training set (colour layouts, paired by prompt and seed: it works
with a handful of images), CLIP score against the prompts, and the cluster distribution metric; each with
its sample size (and a seeded bootstrap 95% interval where one is meaningful).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from PIL import Image
from tqdm.auto import tqdm

from sdnb import metrics
from sdnb.compare.config import SCHEDULERS, CompareConfig
from sdnb.data.captions import read_captions
from sdnb.data.images import load_rgb, to_tensor
from sdnb.models import LORA_META, RUN_META, load_pipeline
from sdnb.stats import bootstrap_ci, entry, fid_entry, mean_entry, non_negative


def make_scheduler(pipe, name: str):
    """The pipeline's scheduler ('' ) or another one of SCHEDULERS built from the pipeline's scheduler config."""
    if not name:
        return pipe.scheduler
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: expected one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], resolution: int = 512, steps: int = 30,
             guidance_scale: float = 7.0, scheduler: str = "", batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] on the CPU, one CPU generator per image (same seed = same starting noise)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    default, pipe.scheduler = pipe.scheduler, make_scheduler(pipe, scheduler)
    out = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            chunk = slice(start, start + batch_size)
            images = pipe(list(prompts[chunk]), height=resolution, width=resolution, num_inference_steps=steps,
                          guidance_scale=guidance_scale, output_type="pt",
                          generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]).images
            out.append(images.float().cpu().mul(2).sub(1).clamp(-1, 1))
    finally:
        pipe.scheduler = default
    return torch.cat(out)


def save_samples(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """Write images as folder/0000.png, ... (the 'base' and 'trained' folders of the seed report)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.png" for i in range(len(images))]
    for path, image in zip(paths, metrics.to_uint8(images)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return paths


def training_data_dir(finetuned_model: str, train_data_dir: str = "") -> str:
    """`train_data_dir`, or the training data a 03 run recorded: in final/sdnb_run.json (a run folder, its final/,
    or a copy of final/ elsewhere), else in the run's config.json (the run folder or the folder above its final/);
    '' when none is known (a hub id, a pipeline folder not written by 03)."""
    if train_data_dir:
        return train_data_dir
    path = Path(finetuned_model)
    if not path.is_dir():
        return ""
    for meta in (path / d / name for d in ("final", "") for name in (RUN_META, LORA_META)):
        if meta.is_file() and json.loads(meta.read_text()).get("data_dir"):
            return json.loads(meta.read_text())["data_dir"]
    for folder in (path, path.parent):
        if (folder / "config.json").is_file() and (folder / "final").is_dir():
            return json.loads((folder / "config.json").read_text()).get("data_dir", "")
    return ""


def training_set(data_dir: str | Path, resolution: int, limit: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The training images, centre-cropped to squares and resized to `resolution` (as generated), with their
    captions ('' where an image has none)."""
    records = read_captions(data_dir, "train_data_dir", keep_uncaptioned=True)[: limit or None]
    images = []
    for record in records:
        image = load_rgb(record.path)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        images.append(to_tensor(image))
    return torch.stack(images), [r.caption for r in records]


def choose_prompts(prompts: Sequence[str], captions: Sequence[str], n_images: int) -> list[str]:
    """`n_images` prompts: the given ones cycled, or else the training captions cycled."""
    source = [p for p in prompts if p] or [c for c in captions if c]
    if not source:
        raise ValueError("prompts=[] and no training caption to take them from: give prompts, or train_data_dir (the "
                         "captioned training images; a run folder of 03 or its final/ records them)")
    return [source[i % len(source)] for i in range(n_images)]


@dataclass
class GenerationSetup:
    """What 04's SD part generates from: the pipelines by name, one prompt and one seed per image, and the training
    images (None when unknown) the samples are measured against."""

    pipes: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    train_images: torch.Tensor | None = None
    data_dir: str = ""


def prepare_generation(cfg: CompareConfig, device: torch.device | str, precision: str) -> GenerationSetup:
    """Load the base and fine-tuned pipelines, find the training images (`train_data_dir` or the 03 run's
    `data_dir`) and choose `n_images` prompts (given, or the training captions cycled) with seeds seed + i."""
    pipes = {"base": load_pipeline(cfg.base_model_id, device, precision, "base_model_id", config=cfg.model_config),
             "finetuned": load_pipeline(cfg.finetuned_model, device, precision, "finetuned_model",
                                        config=cfg.model_config)}
    data_dir = training_data_dir(cfg.finetuned_model, cfg.train_data_dir)
    if data_dir and not cfg.train_data_dir and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"finetuned_model={cfg.finetuned_model!r} was trained on {data_dir!r}, which is not "
                                "there (a new runtime?): set train_data_dir to the training images")
    train_images, captions = training_set(data_dir, cfg.resolution) if data_dir else (None, [])
    if train_images is None:
        print(f"finetuned_model={cfg.finetuned_model!r} records no training data (a hub id, or a pipeline folder not "
              f"written by 03): FID, KID and the cluster KL need train_data_dir (the training images) and are left "
              f"out; the CLIP score and the base vs fine-tuned FID are measured")
    prompts = choose_prompts(cfg.prompts, captions, cfg.n_images)
    return GenerationSetup(pipes, prompts, [cfg.seed + i for i in range(cfg.n_images)], train_images, data_dir)


def sd_metrics(samples: Mapping[str, torch.Tensor], prompts: Sequence[str], train_images: torch.Tensor | None,
               features: str | torch.nn.Module = "auto", clip_model_id: str = "openai/clip-vit-large-patch14",
               n_clusters: int = 10, n_bootstrap: int = 1000, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """FID and KID of each sample set against the training images, FID between the sets, CLIP score against the
    prompts, and KL divergences between cluster distributions (see `kl` in the returned labels).

    `samples` is ordered: the first set is the base. Metrics that need the training images are left out when
    `train_images` is None; CLIP score is left out (with the reason) when its model cannot be loaded.
    """
    names = list(samples)
    extractor, feature_label = metrics.feature_extractor(features, device)
    feats = {k: metrics.image_features(v, extractor) for k, v in samples.items()}
    out: dict = {"n_images": {k: len(v) for k, v in samples.items()}, "models": {k: {} for k in names}, "between": {},
                 "labels": {"fid": f"FID vs training images ({feature_label})",
                            "kid": f"KID vs training images ({feature_label}; mean ± std over subsets)",
                            "kl": f"KL(P || Q) in nats between k-means cluster shares of {feature_label} features",
                            "fid_between": f"FID between the two sample sets ({feature_label})"}}
    a, b = names[0], names[-1]
    if train_images is None:
        out["labels"]["fid_note"] = ("FID and KID against the training images and the cluster KL are left out: no "
                                     "training data is known for this model; set train_data_dir to measure them.")
    out["between"][f"{b} vs {a}"] = {"fid": fid_entry(feats[a], feats[b], paired=False, n_bootstrap=n_bootstrap, seed=seed)}
    if train_images is not None:
        train = metrics.image_features(train_images, extractor)
        out["n_train_images"] = len(train)
        out["labels"]["fid_note"] = (
            f"FID and KID rest on {min(map(len, feats.values()))} generated and {len(train)} training images. With fewer "
            f"images than the {train.shape[1]} features FID's covariances are rank-deficient and FID is biased upwards: "
            "compare FIDs only at equal sample sizes, and read KID (unbiased) beside it.")
        for k in names:
            out["models"][k]["fid"] = fid_entry(train, feats[k], paired=False, n_bootstrap=n_bootstrap, seed=seed)
            kid = metrics.kid_from_features(train, feats[k], seed=seed)
            out["models"][k]["kid"] = entry(kid["mean"], None, len(feats[k]), n_ref=len(train), std=kid["std"],
                                            subset_size=kid["subset_size"])
        out["labels"].update(distance_to_training_set(samples, train_images, n_bootstrap, seed, out))
        out["kl"] = cluster_kl({"original": train, **feats}, [("original", a), ("original", b), (b, a)], n_clusters,
                               n_bootstrap, seed)
        out["labels"]["kl_note"] = (
            f"The report's distribution metric: features of the training images ('original') and of both sample sets "
            f"are pooled, standardised and clustered with k-means (k = {out['kl']['k']}, seed {seed}); each set becomes "
            "a distribution over clusters (counts + 1, normalised) and KL(P || Q) = sum p log(p/q). 0 = same cluster "
            "shares; it sees only which clusters images fall in, not quality within a cluster.")
    _clip_scores(out, samples, prompts, clip_model_id, n_bootstrap, seed, device)
    return out


def _clip_scores(out: dict, samples: Mapping[str, torch.Tensor], prompts: Sequence[str], clip_model_id: str,
                 n_bootstrap: int, seed: int, device: torch.device | str) -> None:
    """Add each sample set's CLIP score against its prompts to `out` (left out, with the reason, when the CLIP model
    cannot be loaded)."""
    try:
        for k in samples:
            scores, label = metrics.clip_scores(samples[k], list(prompts), clip_model_id, device)
            out["models"][k]["clip"] = mean_entry(scores.numpy(), n_bootstrap, seed)
        out["labels"]["clip"] = label
    except OSError as err:
        print(f"CLIP score left out: {clip_model_id!r} could not be loaded ({err})")
        out["labels"]["clip"] = f"CLIP score not computed: {clip_model_id!r} could not be loaded"


def cluster_kl(features: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, str]], n_clusters: int = 10,
               n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """KL(P || Q) for each (P, Q) pair of sets, over k-means clusters of the pooled features; the interval
    resamples each set's images (clusters fixed)."""
    labels = metrics.cluster_shares(dict(features), n_clusters, seed)
    k = int(max(int(v.max()) for v in labels.values()) + 1)
    out: dict = {"k": k, "shares": {n: (torch.bincount(v, minlength=k).double() / len(v)).tolist() for n, v in labels.items()}}
    for p, q in pairs:
        lp, lq = labels[p], labels[q]
        stat = lambda i, j: metrics.kl_divergence(lp[i], lq[j], k)  # noqa: E731
        ci = bootstrap_ci(stat, (len(lp), len(lq)), n_bootstrap, seed, bias_correct=True) if n_bootstrap else None
        out[f"{p} || {q}"] = entry(metrics.kl_divergence(lp, lq, k), non_negative(ci), len(lq), n_ref=len(lp))
    return out


def distance_to_training_set(samples: Mapping[str, torch.Tensor], train_images: torch.Tensor, n_bootstrap: int,
                             seed: int, out: dict) -> dict[str, str]:
    """Each set's mean distance to the training set (`metrics.distance_to_set`) into out["models"], and how much
    closer the last set is than the first, paired by prompt and seed, into out["between"]; returns the labels.
    Unlike FID/KID it needs no large sample: it answers "did the samples move towards the training images?"."""
    names = list(samples)
    dist = {k: metrics.distance_to_set(v, train_images) for k, v in samples.items()}
    for k in names:
        out["models"][k]["train_distance"] = mean_entry(dist[k].numpy(), n_bootstrap, seed)
    a, b = names[0], names[-1]
    out["between"][f"{b} vs {a}"]["train_distance"] = mean_entry((dist[a] - dist[b]).numpy(), n_bootstrap, seed)
    return {"train_distance": "distance to training set: RMS colour difference (0-1) between a 4x4 thumbnail and the "
                              "nearest training image's (lower = closer)",
            "train_distance_between": f"closer to the training set: {a} distance - {b} distance, paired by prompt "
                                      f"and seed (> 0: {b} closer)"}
