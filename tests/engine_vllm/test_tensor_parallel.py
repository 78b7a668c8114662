"""Real tensor parallelism (TP=2, vLLM's multiprocess executor) against the native runner: the plugin's
sharded base weights, LoRA shards (column-parallel B, row-parallel A) and whole KV groups of the interleaved
wqkv per rank give the same prompt ids, greedy tokens and first-step log-probs.

A second engine (about 1-2 minutes to start on 2 CPU cores), so it runs only when asked:
``HD4K_VLLM_TP_TEST=1``. On a CPU machine each rank is bound to one core (``VLLM_CPU_OMP_THREADS_BIND``)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

pytest.importorskip("vllm.entrypoints.llm")  # a submodule: see test_parity.py

from PIL import Image
from vllm_parity import (
    ENGINE_HD_NUM,
    MAX_BATCHED_TOKENS,
    MAX_MODEL_LEN,
    assert_parity,
    native,
    request,
    run_vllm,
    vllm_prompt,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("HD4K_VLLM_TP_TEST") != "1", reason="set HD4K_VLLM_TP_TEST=1 to start a TP=2 engine"
)
TP = 2


@pytest.fixture(scope="module")
def tp_engine(vllm_checkpoint):
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if (os.cpu_count() or 1) < TP:
            pytest.skip(f"TP={TP} on CPU needs {TP} cores")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(TP)))
    llm = LLM(
        model=str(vllm_checkpoint),
        dtype="float32",
        enforce_eager=True,
        tensor_parallel_size=TP,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        mm_processor_kwargs={"hd_num": ENGINE_HD_NUM},
        max_logprobs=-1,
        seed=0,
    )
    yield llm
    del llm  # vLLM's LLM has no shutdown(): its engine processes stop when it is collected
    gc.collect()


def test_tensor_parallel_engine_matches_native(tp_engine, native_runner):
    rng = np.random.default_rng(1)
    landscape = Image.fromarray(rng.integers(0, 256, (300, 520, 3), dtype=np.uint8))
    square = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    reqs = [
        request([landscape], "What does the picture show?", [ENGINE_HD_NUM]),
        request([landscape, square], "Compare them.", [ENGINE_HD_NUM, 2]),
    ]
    got = run_vllm(tp_engine, native_runner, [vllm_prompt(native_runner, r, hd_num=list(r.hd_nums)) for r in reqs])
    for req, g in zip(reqs, got, strict=True):
        assert_parity(native(native_runner, req), g)
