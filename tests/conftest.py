"""Shared test setup: no hub access, fixed seeds."""

from __future__ import annotations

import os
import random

import pytest

# A test never reaches a hub: any hub id must fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HD4K_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass
