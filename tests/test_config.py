"""Config objects: every bad value fails naming its parameter; a saved config loads back."""

from __future__ import annotations

import pytest

from sdnb.caption import CaptionConfig
from sdnb.compare import CompareConfig
from sdnb.config import ConfigError
from sdnb.sd import SDConfig
from sdnb.vae import VAEConfig


@pytest.mark.parametrize("cls,name,value", [
    (VAEConfig, "patch_size", -3),
    (VAEConfig, "patch_size", 100),        # not a multiple of 8
    (VAEConfig, "lr", 0.0),
    (VAEConfig, "lr", "1e-4"),             # a string where a number is expected
    (VAEConfig, "max_steps", 2.5),
    (VAEConfig, "ema", "yes"),
    (VAEConfig, "val_fraction", 0.9),
    (VAEConfig, "optimizer", "sgd"),
    (SDConfig, "resolution", 500),
    (SDConfig, "mixed_precision", "fp8"),
    (CaptionConfig, "device", "gpu"),
    (CompareConfig, "seed", -1),
])
def test_bad_value_names_the_parameter_and_the_range(cls, name, value):
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    message = str(err.value)
    assert message.startswith(f"{name}={value!r}") and "expected" in message


def test_from_namespace_takes_only_known_names_and_round_trips(tmp_path):
    namespace = {"run_dir": str(tmp_path / "run"), "patch_size": 64, "max_steps": 7.0, "unrelated": object()}
    cfg = VAEConfig.from_namespace(namespace)
    assert cfg.max_steps == 7 and isinstance(cfg.max_steps, int)
    path = cfg.save()
    assert VAEConfig.load(path) == cfg
    with pytest.raises(ConfigError, match="'vae' config"):
        SDConfig.load(path)
