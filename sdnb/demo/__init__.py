"""The embedded default (tiny models in the real hub layout and images that ship in packages, written offline)
and the demo runner that executes the four notebooks on it (`python -m sdnb.demo`)."""

from sdnb.demo.run import demo_parameters, run, run_notebook
from sdnb.demo.tiny import TinyAssets, assets_at, build, is_built

__all__ = ["TinyAssets", "assets_at", "build", "demo_parameters", "is_built", "run", "run_notebook"]
