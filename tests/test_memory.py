"""Memory plans: SD 1.5 and its full VAE at 512 px on a 16 GB T4, built with their real architectures on fake
tensors (no weights, no memory), name a configuration that fits; the counting follows the step's real shapes."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from sdnb.demo.fullsize import SD15_SCHEDULER, SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
from sdnb.memory import GiB, Choices, Usage, fake_tensors, optimizer_bytes, step_peak, suggest
from sdnb.memory.table import Target, changes
from sdnb.metrics import LPIPS
from sdnb.sd import SDConfig
from sdnb.sd.memory import memory_plan as sd_plan
from sdnb.vae import VAEConfig
from sdnb.vae.memory import memory_plan as vae_plan

SD15 = {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT_ENCODER, "noise_scheduler": SD15_SCHEDULER}


def test_sd15_at_512_batch_2_on_a_t4_names_a_configuration_that_fits(tmp_path, capsys) -> None:
    cfg = SDConfig(run_dir=str(tmp_path), resolution=512, batch_size=2, optimizer="auto", gradient_checkpointing=True)
    (t4,) = sd_plan(cfg, configs=SD15, device="meta")  # the meta device: plan for a T4 only
    print(t4)
    assert t4.choices.precision == "fp16" and t4.choices.optimizer == "adamw"  # auto: no bitsandbytes here
    u = t4.usage
    assert u.weights == u.gradients == 859_520_964 * 4 and u.optimizer == 2 * u.weights  # AdamW: two fp32 moments
    assert u.frozen == (83_653_863 + 123_060_480) * 2  # VAE and text encoder in fp16
    assert not t4.fits and 15 * GiB < u.total < 18 * GiB
    change, fixed, fixed_usage = t4.fix
    assert "optimizer='adamw8bit'" in change and 'pip install "sdnb[colab]"' in change
    assert fixed.batch_size == 2 and fixed.resolution == 512 and fixed_usage.total <= t4.target.usable
    assert fixed_usage.optimizer < u.optimizer / 3.5
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "fits with: optimizer='adamw8bit'" in out and "activations" in out


def test_the_full_vae_at_512_on_a_t4_names_a_configuration_that_fits(tmp_path) -> None:
    cfg = VAEConfig(run_dir=str(tmp_path), image_dir=str(tmp_path), patch_size=512)  # the sdnb recipe: batch 8
    (t4,) = vae_plan(cfg, config=SD15_VAE, lpips=LPIPS("alex", pretrained_backbone=False), device="meta")
    print(t4)
    assert t4.usage.weights == 83_653_863 * 4 and not t4.fits and t4.usage.activations > 20 * GiB
    change, fixed, fixed_usage = t4.fix
    assert fixed.gradient_checkpointing and fixed.batch_size * fixed.grad_accum == 8  # the effective batch is kept
    assert fixed_usage.total <= t4.target.usable and fixed.resolution == 512


def test_activations_follow_the_batch_and_checkpointing_saves_them() -> None:
    def peak(batch: int, checkpoint: bool) -> int:
        with fake_tensors():
            blocks = nn.Sequential(*[nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
                                     for _ in range(4)])
            x = torch.randn(batch, 256)

            def step() -> torch.Tensor:
                h = x
                for block in blocks:
                    h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpoint else block(h)
                return h.pow(2).mean()

            return step_peak(step, list(blocks.parameters()), "no")[1]

    grown = [peak(b, False) for b in (1024, 2048, 4096)]
    assert abs((grown[2] - grown[1]) - 2 * (grown[1] - grown[0])) <= 0.01 * grown[2]  # linear in the batch
    saved = 4 * 2048 * (256 + 1024 + 1024) * 4  # per block: the input, the GELU input and the second Linear's input
    assert saved <= grown[1] <= saved * 1.3
    assert peak(2048, True) < 0.5 * grown[1]


def test_optimizer_state_and_the_change_that_fits() -> None:
    params = [torch.empty(1000, 1000), torch.empty(100)]
    assert optimizer_bytes("adamw", params) == (8 * 1_000_100, 4 * 1_000_100)
    state, transient = optimizer_bytes("adamw8bit", params)
    assert transient == 0 and state == 2 * (1_000_000 + 4 * 3907) + 8 * 100

    base = Choices(8, 1, 512, "fp16", "adamw", False)

    def total(c: Choices) -> int:  # checkpointing halves activations, batch scales them, 8-bit saves 6 GiB
        act = 8 * GiB * c.batch_size / 8 * (0.5 if c.gradient_checkpointing else 1)
        return int(act + (2 if c.optimizer == "adamw8bit" else 8) * GiB)

    assert [label for label, _ in suggest(total, base, 10 * GiB, changes(base))][0].startswith("optimizer='adamw8bit'")
    picked = suggest(total, base, 5 * GiB, changes(base))  # cumulative until it fits; what it fits without dropped
    assert [label.split(" ")[0] for label, _ in picked] == ["gradient_checkpointing=True", "optimizer='adamw8bit'",
                                                            "batch_size=4,"]
    assert suggest(total, base, 1 * GiB, changes(base)) is None
    t4 = Target.t4()
    assert 13 * GiB < t4.usable < 14.75 * GiB and t4.capability == (7, 5)
    assert Usage(1, 2, 3, 4, 5, 6).total == 21 and replace(base, lora_rank=4).describe().endswith("LoRA rank 4")
