"""The README's two set-up commands stay true: CI runs the test command verbatim, and the main job's
command installs what it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = _bash_blocks(setup)
    assert len(commands) >= 2, "README set-up must show the install+run and the install+test commands"
    main_job, test_cmd = commands[0], commands[1]
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, ".ci/run must run the README's test command exactly"
    # Both stay on the CPU torch wheel installed before the project.
    for cmd in (main_job, test_cmd):
        assert cmd.index("pip install torch==2.13.0") < cmd.index("pip install -e")
    assert "hd4k tiles examples/page.png" in main_job
    assert (ROOT / "examples" / "page.png").is_file()


def test_ci_treats_no_tests_as_failure() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert '"$rc" -eq 5' in ci and "exit 1" in ci


def _python_blocks(section: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.parametrize("section", ["LangChain", "LlamaIndex"])
def test_readme_framework_example_runs_as_written(section: str, tmp_path: Path) -> None:
    """Each framework's README example runs top to bottom in a fresh process (tiny checkpoint, no network)."""
    (code,) = _python_blocks(section)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HD4K_NO_PROGRESS": "1"}
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if section == "LlamaIndex":  # the example shows a refused path coming back as text for the agent
        assert "PathNotAllowedError" in run.stdout
