"""LoRA files (sdnb.lora, python -m sdnb.export): a LoRA run's final/ loads as base + adapter through sdnb.models, and
its kohya-style export loads back through diffusers' `load_lora_weights` with every tensor equal; the kohya deltas
are what the UIs add to each layer."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import CLIPTextModel

from sdnb.export import detect, main
from sdnb.lora import LORA_WEIGHTS, count_parameters, estimate_lora_parameters, lora_to_kohya
from sdnb.models import LORA_META, load_pipeline
from tests.helpers import lora_run


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: everything here works offline."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def adapters(pipe: StableDiffusionPipeline, name: str) -> dict[str, torch.Tensor]:
    model = getattr(pipe, name)
    return get_peft_model_state_dict(model, adapter_name=next(iter(model.peft_config)))


def image(pipe: StableDiffusionPipeline):
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_lora_run_loads_as_base_plus_adapter_and_its_kohya_file_loads_back_exactly(tiny_assets, tmp_path, no_network):
    run = tmp_path / "lora_run"
    trained = lora_run(tiny_assets.sd, run)
    meta = json.loads((run / "final" / LORA_META).read_text())
    assert (meta["rank"], meta["alpha"], meta["text_encoder"]) == (4, 8.0, True)
    n = count_parameters({"unet": trained.unet})
    assert n["trainable"] == estimate_lora_parameters(UNet2DConditionModel.from_pretrained(tiny_assets.sd / "unet"), 4)
    assert n["trainable"] < 0.02 * n["total"]

    loaded = load_pipeline(str(run))  # sdnb.models: the base model named in sdnb_lora.json + load_lora_weights
    expected = image(trained)
    assert (image(loaded) == expected).all()

    assert detect(run) == ("lora", run / "final")
    out = main([str(run)])  # default: run_dir/export/<name>-lora.safetensors, fp32
    assert out == run / "export" / "lora_run-lora.safetensors"
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha").item() == 8.0
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    ui = StableDiffusionPipeline.from_pretrained(tiny_assets.sd, safety_checker=None, requires_safety_checker=False)
    ui.load_lora_weights(str(out))  # diffusers reads kohya files as the UIs write them
    ui.set_progress_bar_config(disable=True)
    for name in ("unet", "text_encoder"):
        want, got = adapters(trained, name), adapters(ui, name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
        config = next(iter(getattr(ui, name).peft_config.values()))
        assert (config.r, config.lora_alpha) == (4, 8)
    assert (image(ui) == expected).all()


def test_merged_export_is_the_base_with_the_lora_fused_in(tiny_assets, tmp_path, no_network):
    run = tmp_path / "lora_run"
    trained = lora_run(tiny_assets.sd, run, alpha=2.0)
    out = main([str(run), str(tmp_path / "merged.safetensors"), "--merged", "--fp32"])
    merged = load_pipeline(str(out), config=str(tiny_assets.sd))
    layer = trained.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    fused = layer.base_layer.weight + layer.get_delta_weight("default")
    torch.testing.assert_close(merged.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight, fused)
    assert not torch.equal(fused, layer.base_layer.weight)


def test_lora_file_changes_each_layer_as_peft_does_when_a_ui_applies_it(tiny_assets):
    torch.manual_seed(0)  # random A and B (init_lora_weights=False): every delta is non-zero; alpha != rank
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]),
        UNet2DConditionModel.from_pretrained(tiny_assets.sd, subfolder="unet"))
    text = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "out_proj", "fc1"]), CLIPTextModel.from_pretrained(tiny_assets.sd, subfolder="text_encoder"))
    state = {**{f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()},
             **{f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(text).items()}}
    kohya = lora_to_kohya(state, alpha={"unet": 8, "text_encoder": 1})

    # How A1111 and ComfyUI apply it: the layer named <prefix><diffusers path, "." -> "_"> gets
    # alpha / rank * up @ down (kernels flattened), e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj.
    layers = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if hasattr(m, "get_delta_weight")}
    layers.update({"lora_te_text_model_" + n.replace(".", "_"): m
                   for n, m in text.named_modules() if hasattr(m, "get_delta_weight")})
    assert {k.split(".")[0] for k in kohya} == set(layers) and len(kohya) == 3 * len(layers)
    for name, layer in layers.items():
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        expected = layer.get_delta_weight("default")
        delta = (up.flatten(1) @ down.flatten(1)).reshape(expected.shape) * alpha / down.shape[0]
        torch.testing.assert_close(delta, expected)

    same = lora_to_kohya(convert_state_dict_to_diffusers(state), alpha={"unet": 8, "text_encoder": 1})
    assert same.keys() == kohya.keys() and all(torch.equal(same[k], kohya[k]) for k in kohya)  # diffusers' names too
    with pytest.raises(ValueError, match="no LoRA weights"):
        lora_to_kohya({"conv_in.weight": torch.zeros(1)})


def test_a_lora_run_whose_base_model_is_gone_says_so(tiny_assets, tmp_path):
    run = tmp_path / "lora_run"
    (run / "final").mkdir(parents=True)
    (run / "final" / LORA_META).write_text(json.dumps({"model_id": str(tmp_path / "gone"), "rank": 4, "alpha": 4}))
    (run / "final" / LORA_WEIGHTS).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"finetuned_model=.*LoRA adapter over .*gone"):
        load_pipeline(str(run), parameter="finetuned_model")
