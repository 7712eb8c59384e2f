"""`CaptionConfig`: 01_captioning's parameters, and the names of BLIP's generation parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sdnb.config import BaseConfig, ConfigError, param

# What `Captioner.caption` takes, what the settings sweep may vary and what the config passes on.
GENERATION_PARAMETERS = ("num_beams", "min_length", "max_length", "repetition_penalty", "top_p", "prompt", "prefix",
                         "suffix", "seed")


@dataclass
class CaptionConfig(BaseConfig):
    """01_captioning: scan a folder of photos, caption them with BLIP, write training copies."""

    stage: ClassVar[str] = "caption"

    image_dir: str = param("data/unsplash-lite/photos", pattern=r".+", help="folder of photos (searched recursively)")
    captioner_id: str = param("Salesforce/blip-image-captioning-base", pattern=r".+")
    fetch_unsplash: bool = param(False, help="download Unsplash Lite photos into image_dir first")
    data_dir: str = param("data", pattern=r".+", help="where the Unsplash Lite metadata is downloaded")
    unsplash_photos: int = param(500, ge=1, help="photos to fetch, chosen reproducibly by seed")
    unsplash_width: int = param(1024, ge=64, help="fetched photos are at most this wide")
    long_side: int = param(1024, ge=64, help="training copies are shrunk to this long side (never enlarged)")
    jpeg_quality: int = param(90, ge=1, le=100, help="JPEG quality of the training copies")
    batch_size: int = param(8, ge=1, help="images captioned at once")
    num_beams: int = param(16, ge=1, help="beam search width (ignored when top_p is set)")
    min_length: int = param(30, ge=0, help="tokens generated at least, after the prompt")
    max_length: int = param(48, ge=1, help="tokens generated at most, after the prompt")
    repetition_penalty: float = param(1.4, gt=0, help="the report's q_factor; 1.0 = no penalty")
    top_p: float | None = param(None, gt=0, le=1, help="nucleus sampling instead of beam search; None = beams")
    prompt: str = param("", help="text BLIP continues from, kept in the caption, e.g. 'a photograph of'")
    prefix: str = param("", help="text put before every caption")
    suffix: str = param(" unsplash photography", help="text put after every caption")
    sweep_images: int = param(5, ge=0, help="sample size of the settings sweep; 0 = no sweep")
    sweep_grid: dict = param({"repetition_penalty": [1.0, 1.4], "min_length": [5, 30]},
                             help="generation parameter -> values to try")
    overwrite: bool = param(False, help="regenerate every caption, even existing or edited ones")

    def validate(self) -> None:
        super().validate()
        if self.min_length > self.max_length:
            raise ConfigError(f"min_length={self.min_length} is not accepted: expected <= max_length={self.max_length}")
        if not isinstance(self.sweep_grid, dict):
            raise ConfigError(f"sweep_grid={self.sweep_grid!r} is not accepted: expected a dict of lists")
        for name, values in self.sweep_grid.items():
            if name not in GENERATION_PARAMETERS or not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"sweep_grid={self.sweep_grid!r} is not accepted: expected keys among "
                                  f"{', '.join(GENERATION_PARAMETERS)}, each with a non-empty list of values (bad: {name!r})")

    def generation(self) -> dict[str, Any]:
        """The captioner's generation parameters (``Captioner.caption`` keywords)."""
        return {name: getattr(self, name) for name in GENERATION_PARAMETERS}
