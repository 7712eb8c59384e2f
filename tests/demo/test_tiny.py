"""Tests of the embedded default (sdnb.tiny): layout, loading through from_pretrained, images, cache,
and the story it has to tell (a photo VAE reconstructs held-out fundus better after fine-tuning).

`tiny_assets` is the session fixture of tests/conftest.py (one build per session)."""

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torchmetrics.functional.image import peak_signal_noise_ratio

from sdnb.demo import models as tiny_models
from sdnb.demo import tiny


@contextmanager
def one_thread():
    """Tiny models train faster on one thread, and do not collapse when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_layout(tiny_assets):
    sd = tiny_assets.sd
    for sub in ("vae", "unet", "text_encoder"):
        assert (sd / sub / "config.json").is_file()
        assert list((sd / sub).glob("*.safetensors")), sub
    assert (sd / "model_index.json").is_file()
    assert (sd / "scheduler" / "scheduler_config.json").is_file()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (sd / "tokenizer" / name).is_file()
    assert (tiny_assets.blip / "model.safetensors").is_file()
    assert (tiny_assets.blip / "vocab.txt").is_file()
    assert (tiny_assets.root / tiny.STAMP_NAME).is_file()
    assert sorted(p.stem.rsplit("_", 1)[0] for p in tiny_assets.scope.glob("*.png")) == \
        ["cells"] * 4 + ["galaxies"] * 4 + ["tissue"] * 4


def test_pipeline_generates_64px(tiny_assets):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets.sd)
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    with one_thread():
        out = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()


def test_vae_loads_with_measured_scaling_factor(tiny_assets):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_assets.sd, subfolder="vae")
    stamp = json.loads((tiny_assets.root / tiny.STAMP_NAME).read_text())
    assert vae.config.scaling_factor == stamp["vae"]["scaling_factor"]
    assert 0.05 < vae.config.scaling_factor < 5
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 4, 16, 16)


def test_clip_tokenizer_matches_open_clip(tiny_assets):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_assets.sd, subfolder="tokenizer")
    ref = SimpleTokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    for text in ("A fundus photograph of a healthy retina, optic disc visible.",
                 "an astronaut riding a horse on Mars, 4k, trending on artstation!"):
        assert tok(text).input_ids == [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id]


def test_blip_captions(tiny_assets):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_assets.blip)
    model = BlipForConditionalGeneration.from_pretrained(tiny_assets.blip).eval()
    image = Image.open(next(tiny_assets.photos.glob("*.png"))).convert("RGB")
    ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=10)
    assert ids[0, 0].item() == processor.tokenizer.convert_tokens_to_ids("[DEC]")
    caption = processor.decode(ids[0], skip_special_tokens=True)
    assert isinstance(caption, str) and "[DEC]" not in caption


def test_fundus_train_and_val_share_no_pixels(tiny_assets):
    from skimage import data

    split = json.loads((tiny_assets.fundus_train.parent / "split.json").read_text())
    retina = data.retina()
    boxes = {}
    for part, folder in (("train", tiny_assets.fundus_train), ("val", tiny_assets.fundus_val)):
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(split[part])
        for name, (left, top, right, bottom) in split[part].items():
            image = np.asarray(Image.open(folder / name))
            assert min(image.shape[:2]) >= 400  # large next to 32-64 px patches
            np.testing.assert_array_equal(image, retina[top:bottom, left:right])
            boxes[(part, name)] = (left, top, right, bottom)
    assert len(split["train"]) == 4 and len(split["val"]) == 2
    for (pa, _), a in boxes.items():
        for (pb, _), b in boxes.items():
            if pa == "train" and pb == "val":
                overlap = min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
                assert not overlap, (a, b)


def test_photos_keep_their_aspect_ratio(tiny_assets):
    sources = tiny._photo_arrays()
    files = sorted(tiny_assets.photos.glob("*.png"))
    assert len(files) == len(sources) >= 5
    for f in files:
        assert Image.open(f).size == sources[f.stem].shape[1::-1]


def test_second_build_is_cached(tiny_assets):
    files = [p for p in tiny_assets.root.rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    t = time.perf_counter()
    again = tiny.build(tiny_assets.root, progress=False)
    assert time.perf_counter() - t < 1.0
    assert again == tiny_assets
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_incomplete_or_other_seed_is_not_built(tiny_assets):
    assert tiny.is_built(tiny_assets.root, seed=0)
    assert not tiny.is_built(tiny_assets.root, seed=1)
    stamp = tiny_assets.root / tiny.STAMP_NAME
    moved = stamp.rename(stamp.with_suffix(".moved"))
    try:
        assert not tiny.is_built(tiny_assets.root, seed=0)  # a half-written build has no stamp
    finally:
        moved.rename(stamp)


def test_cli_prints_paths(tiny_assets, capsys):
    assert tiny.main([str(tiny_assets.root)]) == tiny_assets
    assert str(tiny_assets.sd) in capsys.readouterr().out


def test_vae_pretraining_is_deterministic():
    photos = list(tiny._photo_arrays().values())[:2]

    def weights(seed: int) -> bytes:
        vae = tiny_models.tiny_vae(seed)
        tiny_models.pretrain_vae(vae, photos, steps=3, seed=seed, progress=False)
        return safetensors_bytes({k: v.contiguous() for k, v in vae.state_dict().items()})

    assert weights(0) == weights(0)
    assert weights(0) != weights(1)


def _load(folder: Path) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
            for p in sorted(folder.glob("*.png"))]


def _fundus_patches(images: list[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Random patches inside the fundus (at most 5% of black background)."""
    out = []
    while len(out) < n:
        im = images[int(torch.randint(len(images), (1,), generator=g))]
        y = int(torch.randint(im.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(im.shape[2] - size + 1, (1,), generator=g))
        patch = im[:, y:y + size, x:x + size]
        if (patch.mean(0) < -0.85).float().mean() <= 0.05:
            out.append(patch)
    return torch.stack(out)


def _psnr(vae, x: torch.Tensor) -> float:
    with torch.no_grad():
        rec = vae(x, sample_posterior=False).sample.clamp(-1, 1)
    return peak_signal_noise_ratio(rec, x, data_range=2.0, dim=(1, 2, 3)).item()


def test_vae_finetune_on_fundus_improves_heldout_psnr(tiny_assets):
    """The story in miniature: the photo VAE, fine-tuned on fundus train patches, reconstructs
    held-out fundus val patches clearly better."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_assets.sd, subfolder="vae")
    val = _fundus_patches(_load(tiny_assets.fundus_val), 16, 64, torch.Generator().manual_seed(0))
    train = _load(tiny_assets.fundus_train)
    before = _psnr(vae, val)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(vae.parameters(), lr=5e-4)
    vae.train()
    with one_thread():
        for _ in range(100):
            x = _fundus_patches(train, 8, 32, g)
            posterior = vae.encode(x).latent_dist
            loss = F.mse_loss(vae.decode(posterior.sample(generator=g)).sample, x) + 1e-6 * posterior.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    vae.eval()
    after = _psnr(vae, val)
    print(f"held-out fundus PSNR: {before:.2f} dB -> {after:.2f} dB")
    assert after > before + 4.0, (before, after)
