"""`python -m sdnb.train run_dir/config.json` (also under `accelerate launch -m sdnb.train`): run the training a
notebook configured, through the stage named in the config (`sdnb.vae` or `sdnb.sd`), without display."""

from __future__ import annotations

import importlib
import json
import sys

STAGES = ("vae", "sd")


def main(argv: list[str] | None = None) -> None:
    """Read the config and call `sdnb.<stage>.train_from_config(config)`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m sdnb.train run_dir/config.json")
    with open(argv[0]) as f:
        config = json.load(f)
    stage = config.get("stage")
    if stage not in STAGES:
        raise SystemExit(f"{argv[0]}: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    importlib.import_module(f"sdnb.{stage}").train_from_config(config)  # the stage is chosen at run time


if __name__ == "__main__":
    main()
