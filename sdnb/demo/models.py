"""The embedded default's tiny SD v1 pipeline, written through the same classes and `save_pretrained` layout as the
real one: real CLIP tokenizer, a VAE briefly trained on photos, then a UNet and text encoder briefly trained on the
captioned photos (`sdnb.demo.unet`). The tiny BLIP is in `sdnb.demo.blip`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdnb.demo.unet import pretrain_unet

VAE_STEPS = 300  # photo pre-training of the tiny VAE (batch 8, 32 px crops, one thread): ~25 s CPU time
VAE_BATCH, VAE_CROP, VAE_LR, VAE_KL = 8, 32, 2e-3, 1e-6


def write_clip_tokenizer_files(out: Path) -> None:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (vocab 49408) from open_clip's BPE file."""
    import open_clip  # optional (the "offline" extra): it ships CLIP's BPE vocabulary
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {bpe}; install open_clip_torch")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tiny_vae(seed: int = 0):
    """A tiny `AutoencoderKL` (channels 16/32/32, down-sampling 4, 4 latent channels), seeded init."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64)


def _random_crops(images: list, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """`n` random `size` crops (random image, position and horizontal flip) from CHW tensors."""
    out = []
    for _ in range(n):
        im = images[int(torch.randint(len(images), (1,), generator=g))]
        y = int(torch.randint(im.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(im.shape[2] - size + 1, (1,), generator=g))
        crop = im[:, y:y + size, x:x + size]
        out.append(crop.flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else crop)
    return torch.stack(out)


def pretrain_vae(vae, photos: list[np.ndarray], steps: int = VAE_STEPS, seed: int = 0,
                 progress: bool = True) -> dict:
    """Train `vae` in place on random photo crops (MSE + 1e-6 KL, Adam, cosine lr) and set its
    ``scaling_factor`` to 1/std of its latents on 64 px photo crops. Returns what was measured."""
    images = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 127.5 - 1 for p in photos]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=steps)
    threads = torch.get_num_threads()
    # One thread: these ops are too small to gain from more, and the result then does not depend
    # on the machine's core count (nor collapse when other processes share the cores).
    torch.set_num_threads(1)
    try:
        vae.train()
        for _ in tqdm(range(steps), desc="tiny VAE on photos", disable=not progress):
            x = _random_crops(images, VAE_BATCH, VAE_CROP, g)
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=g)).sample
            loss = F.mse_loss(rec, x) + VAE_KL * posterior.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        vae.eval()
        with torch.no_grad():
            z = vae.encode(_random_crops(images, 64, 64, g)).latent_dist.sample(generator=g)
    finally:
        torch.set_num_threads(threads)
    std = z.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return {"steps": steps, "final_loss": round(loss.item(), 5), "latent_std": round(std, 5),
            "latent_mean": round(z.mean().item(), 5), "scaling_factor": vae.config.scaling_factor}


def write_sd(out: Path, photos: list[np.ndarray], captions: list[str] | None = None, seed: int = 0,
             progress: bool = True) -> dict:
    """Assemble a tiny SD v1 pipeline (VAE pre-trained on `photos`; with `captions`, UNet and text encoder then
    pre-trained on the captioned photos) and `save_pretrained` it to `out`. Returns what was measured."""
    write_clip_tokenizer_files(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=77)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    with torch.no_grad():  # word vectors as large as the position vectors' sum would not let prompts differ enough
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(  # 2 attention heads: the 16x16 self-attention dominates a step's cost on a CPU
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
    # SD v1's scheduler config (runwayml / CompVis model_index: PNDMScheduler)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                              steps_offset=1)
    vae = tiny_vae(seed + 3)
    info = {"vae": pretrain_vae(vae, photos, seed=seed + 4, progress=progress)}
    if captions is not None:
        small = [Image.fromarray(p) for p in photos]
        for im in small:
            im.thumbnail((256, 256), Image.BICUBIC)
        info["unet"] = pretrain_unet(unet, text_encoder, tokenizer, vae.eval(), dict(scheduler.config), small,
                                     captions, seed=seed + 7, progress=progress)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    _drop_load_time_keys(out / "tokenizer" / "tokenizer_config.json")
    return info


def _drop_load_time_keys(config: Path) -> None:
    """Remove what `from_pretrained` on a local folder leaves in a saved tokenizer config."""
    data = json.loads(config.read_text())
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
