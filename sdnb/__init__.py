"""sdnb: notebooks and a thin library for fine-tuning Stable Diffusion on your own images."""

__version__ = "0.1.0"
