"""Reported numbers: each one with its 95% bootstrap interval and sample size, the tables that show them, and
`metrics.json`.

An entry is `{"value", "ci95": [low, high], "n"}`: the interval is a seeded percentile bootstrap over the images
(paired where an image and its reconstructions are resampled together), and `n` is the number of images it rests on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from sdnb import metrics

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "rfid": False, "fid": False, "kid": False,
                    "train_distance": False,
                    "clip": True}
NAMES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID", "fid": "FID", "kid": "KID", "clip": "CLIP score",
         "train_distance": "distance to training set"}


def entry(value: float, ci95: tuple[float, float] | None, n: int, **extra) -> dict:
    """One reported number with its 95% interval and sample size."""
    out = {"value": float(value), "ci95": None if ci95 is None else [float(ci95[0]), float(ci95[1])], "n": int(n)}
    return {**out, **extra}


def mean_entry(values, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean of per-image values, bootstrap interval, n."""
    values = np.asarray(values, dtype=float)
    return entry(values.mean(), mean_ci(values, n_bootstrap, seed) if n_bootstrap else None, len(values))


def fid_entry(real: torch.Tensor, fake: torch.Tensor, paired: bool, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """FID between two feature sets with a bias-corrected bootstrap interval (paired: rows resampled together)."""
    value = metrics.fid_from_features(real, fake)
    stat = metrics.fid_resampler(real, fake)
    if paired:
        ci = bootstrap_ci(lambda i: stat(i, i), (len(real),), n_bootstrap, seed, bias_correct=True) if n_bootstrap else None
        return entry(value, non_negative(ci), len(real))
    ci = bootstrap_ci(stat, (len(real), len(fake)), n_bootstrap, seed, bias_correct=True) if n_bootstrap else None
    return entry(value, non_negative(ci), len(fake), n_ref=len(real))


def non_negative(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    """A bias-corrected interval of a non-negative quantity (FID, KL) clipped at 0."""
    return None if ci is None else (max(ci[0], 0.0), max(ci[1], 0.0))


def bootstrap_ci(statistic, sizes: tuple[int, ...], n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 bias_correct: bool = False) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*index_arrays)`: each resample draws, with replacement, one
    index array per entry of `sizes` (one entry = paired data, e.g. an image and its reconstruction).

    `bias_correct` shifts the interval by the bootstrap estimate of bias (mean of the resamples minus the full-sample
    value): set statistics such as FID grow when resampling duplicates images, which would push the plain
    percentile interval above the estimate.
    """
    rng = np.random.default_rng(seed)
    with threadpool_limits(1):  # many small matrix operations: threads only add overhead
        values = np.array([statistic(*(rng.integers(0, n, n) for n in sizes)) for _ in range(n_resamples)])
        shift = np.nanmean(values) - statistic(*(np.arange(n) for n in sizes)) if bias_correct else 0.0
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)]) - shift
    return float(lo), float(hi)


def mean_ci(values, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (vectorised)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_resamples, len(values)))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _num(x: float) -> str:
    return f"{x:.4g}"


def cell(e: Mapping) -> str:
    """'value [low, high] n=N' (with ' vs M' for a reference set, '± std' for KID)."""
    text = _num(e["value"])
    if "std" in e:
        text += f" ± {_num(e['std'])} (subsets of {e['subset_size']})"
    if e.get("ci95"):
        text += f" [{_num(e['ci95'][0])}, {_num(e['ci95'][1])}]"
    text += f" n={e['n']}" + (f" vs {e['n_ref']}" if "n_ref" in e else "")
    if "ties" in e and e["ties"]:
        text += f" (ties {e['ties']:.0%})"
    return text


@dataclass
class Table:
    """A titled table of strings."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


def tables(section: Mapping) -> list[Table]:
    """The tables of a VAE or SD metrics section (`sdnb.compare.compare_vaes` / `sdnb.compare_sd.sd_metrics`)."""
    labels, out = section.get("labels", {}), []
    models = section.get("models", {})
    keys = [k for k in NAMES if any(k in m for m in models.values())]
    if models:
        t = Table("Each model (95% bootstrap interval in brackets, n = images)", ["metric", *models])
        t.rows = [[labels.get(k, NAMES[k])] + [cell(m[k]) if k in m else "-" for m in models.values()] for k in keys]
        out.append(t)
    for group, title in (("wins", "Share of images on which the first model is better"),
                         ("difference", "Mean paired difference per image, first minus second (PSNR, SSIM: > 0 = "
                                        "first better; LPIPS: < 0 = first better)"),
                         ("change", "How far apart the two models' outputs are (identical models: PSNR = cap, "
                                    "SSIM 1, LPIPS 0, rFID 0)"),
                         ("between", "Between the two sample sets (identical models: 0)")):
        if section.get(group):
            ks = [k for k in NAMES if any(k in v for v in section[group].values())]
            t = Table(title, ["pair", *[labels.get(k, NAMES[k]) if group != "between" else labels.get(f"{k}_between", k)
                                        for k in ks]])
            t.rows = [[pair] + [cell(v[k]) if k in v else "-" for k in ks] for pair, v in section[group].items()]
            out.append(t)
    if "kl" in section:
        t = Table(labels.get("kl", "KL divergence"), ["KL(P || Q)", "value [95% interval] n = Q's images vs P's"])
        t.rows = [[pair, cell(v)] for pair, v in section["kl"].items() if isinstance(v, dict) and "value" in v]
        t.rows.append(["clusters", str(section["kl"]["k"])])
        out.append(t)
    return out


def text_table(section: Mapping) -> str:
    """The tables as plain text (for the notebook's output)."""
    lines = [section["description"]] if section.get("description") else []
    for t in tables(section):
        widths = [max(len(str(r[i])) for r in [t.header, *t.rows]) for i in range(len(t.header))]
        lines += ["", t.title, "  ".join(h.ljust(w) for h, w in zip(t.header, widths))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in t.rows]
    notes = [v for k, v in section.get("labels", {}).items() if k.endswith("note")]
    verdict = ["", "In words: " + section["verdict"]] if section.get("verdict") else []
    return "\n".join(lines + notes + verdict)


def write_metrics(path: str | Path, **sections: Mapping | None) -> Path:
    """Write `path` (a run's metrics.json) with the given sections, e.g. `vae=...` (the VAE comparison, the same
    schema in 02 and 04), `sd=...` (04's SD comparison), `training=...` (03's summary); sections already in the
    file are kept unless given again, None sections are left out. Written through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update({k: v for k, v in sections.items() if v is not None})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path
