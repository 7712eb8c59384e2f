"""A tiny CLIP for the embedded default: the CLIP score's code path offline (`clip_model_id` = its folder).

The real CLIP tokenizer comes from a tiny SD's tokenizer/ folder (`sdnb.tiny` writes it from open_clip's
vocabulary); the towers are tiny. Untrained, its scores say nothing; trained for a few hundred contrastive
steps on a few captioned photos, a fitting caption scores higher than another one, in miniature.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from sdnb.data.images import find_images, load_rgb


def build_tiny_clip(tokenizer_dir: str | Path, out_dir: str | Path, photo_dir: str | Path | None = None,
                    steps: int = 200, seed: int = 0, shapes: dict | None = None, image_size: int = 32) -> Path:
    """A tiny `CLIPModel` with its `CLIPProcessor` (the real CLIP tokenizer read from `tokenizer_dir`, e.g. a tiny
    SD's tokenizer/ folder), saved to `out_dir`: the CLIP score's code path offline (returns at once if built).

    With `photo_dir` it is trained for `steps` contrastive steps on those photos, each captioned from its file name
    ("a photograph of grace hopper"), so that in miniature a fitting caption scores higher than another one.
    `shapes` (a `CLIPConfig` dict such as `sdnb.demo.fullsize.CLIP_VIT_L14`, with its `image_size`) gives other shapes.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "preprocessor_config.json").is_file():
        return out_dir
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    shapes = shapes or dict(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**shapes))
    crop = {"height": image_size, "width": image_size}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop),
                              tokenizer=tokenizer)
    if photo_dir is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: more threads only spin, and results stay machine-independent
        try:
            _train_clip(model, processor, photo_dir, steps, seed)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _train_clip(model, processor, photo_dir: str | Path, steps: int, seed: int) -> None:
    """Contrastive steps on random crops of the photos against captions made from their file names."""
    paths = [r.path for r in find_images(photo_dir, "photo_dir", progress=False)]
    photos = []
    for p in paths:  # shrunk once: the model sees 32 px
        im = load_rgb(p)
        im.thumbnail((96 * im.width // min(im.size), 96 * im.height // min(im.size)))
        photos.append(im)
    text = processor(text=[f"a photograph of {Path(p).stem.replace('_', ' ')}" for p in paths], return_tensors="pt",
                     padding=True)
    rng = np.random.default_rng(seed)
    model.text_model.embeddings.token_embedding.requires_grad_(False)  # 49408 x 32: random word vectors will do
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(steps):
        crops = []
        for im in photos:  # a random square crop of at least half the short side
            side = int(min(im.size) * rng.uniform(0.5, 1.0))
            x, y = int(rng.integers(im.width - side + 1)), int(rng.integers(im.height - side + 1))
            crops.append(im.crop((x, y, x + side, y + side)))
        pixels = processor(images=crops, return_tensors="pt")["pixel_values"]
        loss = model(**text, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
