"""A process that used ``engine="vllm"`` and exits without closing it ends cleanly: the runner's ``atexit``
hook shuts vLLM's engine down while the interpreter is whole, so stderr holds no traceback (from
``AsyncLLM.__del__`` during teardown) and no leaked shared-memory warning (from the resource tracker).

Run in the vLLM environment only (``pytest tests/engine_vllm``; see ``.ci/run``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm")

SCRIPT = textwrap.dedent(
    """
    import sys

    from hd4k_tools import HD4K

    if __name__ == "__main__":  # vLLM starts its engine process with spawn
        hd = HD4K.from_pretrained(
            sys.argv[1], engine="vllm", hd_num=1, enforce_eager=True, max_model_len=2048, max_num_seqs=2
        )
        print("ANSWER", repr(hd.chat("Say something.", generation={"max_new_tokens": 4}).text), flush=True)
        # No hd.close(): the interpreter exits with the engine running.
    """
)


def test_exit_without_close_is_clean(tmp_path: Path, vllm_checkpoint: Path) -> None:
    script = tmp_path / "use_vllm.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, str(script), str(vllm_checkpoint)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ANSWER" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-4000:]
    assert "force killing" not in done.stderr, done.stderr[-4000:]
