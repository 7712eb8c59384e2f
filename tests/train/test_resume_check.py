"""What a resumed run may change in its config: every field classified, refusals named with both values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sdnb.config import ConfigError
from sdnb.sd import SDConfig
from sdnb.vae import VAEConfig
from sdnb.train.resume_check import ALLOWED, IGNORED, REFUSED, ConfigChangeError, compare_configs


def saved(cfg) -> dict:
    """A config as a checkpoint holds it: to_dict through JSON (lists for tuples)."""
    return json.loads(json.dumps(cfg.to_dict()))


@pytest.mark.parametrize("cls", [VAEConfig, SDConfig])
def test_every_field_is_classified_exactly_once(cls) -> None:
    names = {f.name for f in dataclasses.fields(cls)} | {"stage"}
    unclassified = names - (ALLOWED | IGNORED | REFUSED)
    assert not unclassified, f"classify these {cls.__name__} fields in sdnb/train/resume_check.py: {sorted(unclassified)}"
    assert not (ALLOWED & IGNORED) and not (ALLOWED & REFUSED) and not (IGNORED & REFUSED)


def test_the_lists_name_only_real_fields() -> None:
    known = {f.name for cls in (VAEConfig, SDConfig) for f in dataclasses.fields(cls)} | {"stage"}
    assert (ALLOWED | IGNORED | REFUSED) - known == set()  # no typo that would leave a field unprotected


def test_a_second_stage_changes_budget_and_lr_but_not_batch_or_seed() -> None:
    first = VAEConfig(run_dir="runs/02", max_steps=1000)
    second = VAEConfig(run_dir="/content/runs/02", max_steps=3000, lr=5e-5, batch_size=4, seed=1, resume="latest",
                       adam_betas=(0.9, 0.999), validate_every=250)
    changes = compare_configs(saved(first), second.to_dict())
    assert changes.refused == [("batch_size", 8, 4), ("seed", 0, 1)]
    assert changes.allowed == [("lr", 0.0001, 5e-05), ("max_steps", 1000, 3000), ("validate_every", 0, 250)]
    assert changes.message() == (
        "the checkpoint was trained with other settings, which a resumed run cannot change:\n"
        "  batch_size: 8 in the checkpoint, now 4\n"
        "  seed: 0 in the checkpoint, now 1\n"
        "start a new run_dir, or set these back to the saved values")
    assert changes.summary() == "changed for this stage: lr 0.0001 -> 5e-05, max_steps 1000 -> 3000, " \
                                "validate_every 0 -> 250"
    with pytest.raises(ConfigChangeError) as err:
        changes.raise_if_refused("runs/02/checkpoints/step-001000")
    assert isinstance(err.value, ConfigError)
    assert str(err.value).splitlines()[1] == "  batch_size: 8 in runs/02/checkpoints/step-001000, now 4"


def test_a_recipe_change_is_refused_with_what_it_changes_and_sd_keeps_its_own_fields() -> None:
    changes = compare_configs(saved(VAEConfig()), VAEConfig(recipe="ft-mse").to_dict())
    assert changes.refused == [("kl_weight", 1e-06, 0.0), ("recipe", "sdnb", "ft-mse"), ("rot90", True, False),
                               ("trainable", "all", "decoder"), ("vflip", True, False)]  # the recipe's values
    sd = SDConfig(max_epochs=30)
    changes = compare_configs(saved(sd), SDConfig(max_epochs=60, train_text_encoder=True, text_encoder_lr=1e-6,
                                                  sample_prompts=["a cat"], sync_what="weights").to_dict())
    assert [n for n, _, _ in changes.refused] == ["train_text_encoder"]
    assert [n for n, _, _ in changes.allowed] == ["max_epochs", "sample_prompts", "sync_what", "text_encoder_lr"]


def test_a_field_the_saved_config_lacks_is_reported_not_refused() -> None:
    old = saved(SDConfig())
    del old["noise_offset"]  # a checkpoint of an sdnb from before this field
    old["retired_option"] = 3  # and one sdnb has dropped since
    changes = compare_configs(old, SDConfig().to_dict())
    assert changes.ok and changes.unknown == [("noise_offset", "<absent>", 0.02), ("retired_option", 3, "<absent>")]
    assert changes.summary() == ("changed for this stage: noise_offset = 0.02 (not in the saved config), "
                                 "retired_option (saved as 3, no longer a setting)")
    assert compare_configs(saved(SDConfig()), SDConfig().to_dict()).summary() == "no config change"
