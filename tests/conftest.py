"""Shared fixtures: the embedded default is built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny offline models and images (sdnb.tiny), built once into a session folder."""
    from sdnb.demo import build

    return build(tmp_path_factory.mktemp("tiny"), progress=False)
