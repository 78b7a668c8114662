"""Fixtures of the LlamaIndex integration tests (this folder's conftest)."""

from __future__ import annotations

import pytest
from llamaindex_support import RecordingRunner

from hd4k_tools import HD4K


@pytest.fixture
def runner(hd4k_tiny: HD4K) -> RecordingRunner:
    """The session's tiny-model runner, recorded (see llamaindex_support)."""
    return RecordingRunner(hd4k_tiny.runner)
