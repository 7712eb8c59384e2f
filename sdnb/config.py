"""The parameter machinery: one validated config object per notebook, built from its parameters cell and saved
as run_dir/config.json.

Each field carries its accepted range; a bad value fails with a `ConfigError` that names the parameter,
the value and what is accepted. The config classes themselves live beside the code that reads them:
`sdnb.train.TrainConfig` (the loop), `sdnb.caption.CaptionConfig`, `sdnb.vae.VAEConfig`, `sdnb.sd.SDConfig`
and `sdnb.compare.CompareConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints


class ConfigError(ValueError):
    """A notebook parameter has a value outside its accepted range."""


def param(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          choices: tuple | None = None, multiple_of: int | None = None, pattern: str | None = None,
          help: str = "") -> Any:
    """A config field with its accepted range (checked by `validate`)."""
    meta = dict(ge=ge, gt=gt, le=le, choices=choices, multiple_of=multiple_of, pattern=pattern, help=help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


def _describe(kind: type, meta: Mapping) -> str:
    parts = [{int: "an integer", float: "a number", str: "a string", bool: "True or False", list: "a list"}.get(kind, str(kind))]
    if meta.get("choices"):
        parts = ["one of " + ", ".join(repr(c) for c in meta["choices"])]
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    if meta.get("multiple_of"):
        parts.append(f"a multiple of {meta['multiple_of']}")
    if meta.get("pattern"):
        parts.append(f"matching {meta['pattern']}")
    return " ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if parts[1:] else "")


def _check(name: str, value: Any, kind: Any, meta: Mapping) -> Any:
    """Return the value coerced to its kind, or raise ConfigError naming the parameter."""
    base = getattr(kind, "__origin__", kind)
    optional = base is not None and "None" in str(kind)
    if value is None and optional:
        return None
    if optional:  # Optional[X] written as `X | None`
        base = next(a for a in kind.__args__ if a is not type(None))
        base = getattr(base, "__origin__", base)
    bad = ConfigError(f"{name}={value!r} is not accepted: expected {_describe(base, meta)}"
                      + (f" ({meta['help']})" if meta.get("help") else ""))
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad
        value = int(value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad
    elif base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        value = list(value)
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise bad
    if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], value):
        raise bad
    if isinstance(value, (int, float)):
        if (meta.get("ge") is not None and value < meta["ge"]) or (meta.get("gt") is not None and value <= meta["gt"]) \
                or (meta.get("le") is not None and value > meta["le"]):
            raise bad
        if meta.get("multiple_of") and value % meta["multiple_of"]:
            raise bad
    return value


@dataclass
class BaseConfig:
    """Parameters every notebook shares."""

    stage: ClassVar[str] = "base"

    run_dir: str = param("runs/run", pattern=r".+", help="everything the notebook writes goes under it")
    sync_dir: str = param("", help="mirror of checkpoints, e.g. /content/drive/MyDrive/sdnb; '' = off")
    seed: int = param(0, ge=0)
    device: str = param("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?")
    mixed_precision: str = param("auto", choices=("auto", "no", "fp16", "bf16"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and coerce every field; raise ConfigError naming the first bad parameter."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check(f.name, getattr(self, f.name), hints[f.name], f.metadata))

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> "BaseConfig":
        """Build the config from a notebook's variables (the parameters cell): `Config.from_namespace(globals())`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in namespace.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values, with its stage."""
        return {"stage": self.stage, **dataclasses.asdict(self)}

    @property
    def path(self) -> Path:
        """The run folder."""
        return Path(self.run_dir)

    def save(self) -> Path:
        """Write run_dir/config.json and return its path."""
        self.path.mkdir(parents=True, exist_ok=True)
        out = self.path / "config.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(out)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BaseConfig":
        """Build the config from a saved dict (`to_dict`'s output); the stage key is checked."""
        data = dict(data)
        stage = data.pop("stage", cls.stage)
        if stage != cls.stage:
            raise ConfigError(f"a {stage!r} config is not a {cls.stage!r} config")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "BaseConfig":
        """Read a saved config.json back (the stage key is checked)."""
        data = json.loads(Path(path).read_text())
        stage = data.pop("stage", cls.stage)
        if stage != cls.stage:
            raise ConfigError(f"{path} is a {stage!r} config, not {cls.stage!r}")
        return cls(**data)

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"{f.name:<{width}} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self))
