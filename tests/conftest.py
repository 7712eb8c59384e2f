"""Shared fixtures: the embedded default is built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny offline models and images (sdnb.tiny), built once into a session folder."""
    from sdnb.demo import build

    return build(tmp_path_factory.mktemp("tiny"), progress=False)


@pytest.fixture(scope="session")
def tiny_single_file(tiny_assets, tmp_path_factory):
    """The embedded default's SD pipeline as one SD v1 checkpoint file (fp32, so that it holds the same weights), as a
    base model downloaded from a model site would come."""
    import torch

    from sdnb.singlefile import export_pipeline

    return export_pipeline(tiny_assets.sd, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors", torch.float32)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (two crawl on a busy 2-core machine); restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
