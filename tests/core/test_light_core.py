"""A light core (issue 13): ``pip install hd4k-tools`` has no torch; the native model is the ``local`` extra,
and asking for it without the extra is a typed error that names the extra. Checked in a subprocess whose
import system refuses the extra's packages, as on a machine that never installed them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCAL_PACKAGES = ("torch", "transformers", "sentencepiece", "safetensors", "huggingface_hub")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    BLOCKED = {LOCAL_PACKAGES!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "light.py"
    script.write_text(BLOCKER + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_the_core_dependencies_have_no_torch_and_the_local_extra_has_the_model_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert not any(package.replace("_", "-") in core for package in LOCAL_PACKAGES)
    local = " ".join(project["optional-dependencies"]["local"])
    assert all(package.replace("_", "-") in local for package in LOCAL_PACKAGES)
    # The test environment is `all` + `ray` + requirements-dev.txt (no published `dev` extra).
    assert "dev" not in project["optional-dependencies"]
    assert "local" in project["optional-dependencies"]["all"][0]


def test_agent_hosts_work_without_torch_and_the_native_runner_names_the_extra(tmp_path: Path) -> None:
    out = _run(
        """
        import sys
        from hd4k_tools import HD4K, AgentTools, ToolSettings, errors
        from hd4k_tools.adapters import as_hd4k
        from langchain_hd4k import ChatHD4K, HD4KToolkit
        from llama_index.tools.hd4k import HD4KToolSpec

        hd = HD4K.remote("http://127.0.0.1:9", model="ixc2-4khd")
        AgentTools(hd, ToolSettings())
        ChatHD4K(hd=hd)
        assert len(HD4KToolkit(hd).get_tools()) == 3
        assert len(HD4KToolSpec(hd).to_tool_list()) == 3
        try:
            HD4K.from_pretrained("some-checkpoint")
        except errors.MissingDependencyError as err:
            print("ERROR:", err)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("LOADED:", loaded)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED: []" in out.stdout
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR:"))
    assert "torch" in error and 'pip install "hd4k-tools[local]"' in error
