"""Shared test setup: no hub access, fixed seeds."""

from __future__ import annotations

import os
import random

import pytest

# A test never reaches a hub: any hub id must fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HD4K_NO_PROGRESS", "1")


# ----------------------------------------------------------------------------------------------------
# The quick subset: `pytest -m "not slow" -n 2` (README, "Set up")
# ----------------------------------------------------------------------------------------------------
# Whole modules whose tests start processes (servers, MCP over stdio/HTTP, Ray, kernels) or fuzz; single
# tests elsewhere carry @pytest.mark.slow or are listed in SLOW_TESTS. CI runs everything.
SLOW_MODULES = frozenset(
    {
        "tests/core/test_notebooks.py",
        "tests/core/test_openai_clients.py",
        "tests/core/test_openai_structured_clients.py",
        "tests/core/test_readme.py",
        "tests/hostile/test_hostile_fuzz.py",
        "tests/hostile/test_hostile_server.py",
        "tests/ingest/test_ingest_durable.py",
        "tests/ingest/test_ingest_ray.py",
        "tests/ingest/test_ingest_readme.py",
        "tests/mcp/test_mcp_edges.py",
        "tests/mcp/test_mcp_server.py",
    }
)
# module::test (parameters stripped) of single slow tests in otherwise quick modules.
SLOW_TESTS = frozenset(
    {
        "tests/core/test_cli.py::test_installed_console_script",
        "tests/core/test_cli_model.py::test_serve_on_a_port_in_use_is_one_line_and_exit_2",
        "tests/core/test_light_core.py::test_agent_hosts_work_without_torch_and_the_native_runner_names_the_extra",
        "tests/core/test_server_api.py::test_real_server_defaults_metrics_and_access_log",
        "tests/hostile/test_hostile_pdf_cli.py::test_cli_symlink_loop_in_a_real_process",
        "tests/ingest/test_ingest_local.py::test_a_killed_cli_run_restarts_and_ends_with_the_same_records",
    }
)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = os.path.relpath(str(item.path), _ROOT).replace(os.sep, "/")
        name = item.originalname if isinstance(item, pytest.Function) else item.name
        if module in SLOW_MODULES or f"{module}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


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


# ----------------------------------------------------------------------------------------------------
# Tiny InternLM-XComposer2-4KHD checkpoint (official on-disk layout, random weights)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Path of a tiny checkpoint (2 ``.bin`` shards + index, seed 0), written once per session."""
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ixc2"), seed=0, format="bin", shards=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded (``LoadedModel``: .model float32 on CPU, .tokenizer, .config)."""
    from hd4k_tools.models.xcomposer2_4khd import load_pretrained

    return load_pretrained(tiny_checkpoint, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="session")
def hd4k_tiny(tiny_model):
    """An :class:`hd4k_tools.HD4K` over the tiny model (shared; its runner serialises calls)."""
    from hd4k_tools import HD4K, LocalRunner

    return HD4K(LocalRunner(tiny_model, model_id="tiny-ixc2-4khd"))
