"""The README runs as written (issue 23.2).

The two set-up commands stay true: CI runs the test command verbatim, and the main job's command installs
what it runs. Every other ``bash`` and ``python`` block of README.md and notebooks/README.md runs, in the
order of the file, in one bash session in a copy of the repository whose ``.venv`` is this interpreter's
environment, as the set-up leaves it (``.venv/bin/...``; the venv is NOT on ``$PATH``, so a bare ``hd4k``
or ``pip`` fails as it would for a new user). Blocks that start ``hd4k serve ... &`` leave the server to
the blocks after them; every background job is stopped at the end.

Not run, each for a reason the reader sees or that the test checks otherwise:

- a block whose first line is ``# needs: ...`` (a GPU, the real checkpoint, vLLM, a Ray cluster, a
  browser): shown to the reader as such, listed here as skipped;
- the set-up commands themselves (the ``python3 -m venv`` blocks of "Set up": the test command is what CI
  runs, see above);
- ``pip install`` lines: not re-run inside the environment under test (an editable install from the copy
  would repoint the venv); the test checks instead that each ``-e PATH`` exists and each ``[extra]`` is
  one of the project's extras;
- ``pytest`` lines: the suite runs those tests itself; the test checks that the paths exist.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
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


BLOCK_FILES = ("README.md", "notebooks/README.md")
NEEDS = "# needs:"
_FENCE = re.compile(r"^```(\w*)\s*$")
_PIP_INSTALL = re.compile(r"^\s*(?:\.venv/bin/)?pip install\b(.*)$")
_PYTEST = re.compile(r"^\s*(?:\.venv/bin/)?(?:pytest|python -m pytest)\b(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text and the section it is in."""

    file: str
    line: int
    language: str
    code: str
    section: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line} ({self.section})"

    @property
    def needs(self) -> str | None:
        """The reason the block does not run here (its first line ``# needs: ...``), if it has one."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NEEDS) :].strip() if first.startswith(NEEDS) else None


def parse_blocks(file: str) -> list[Block]:
    """The fenced blocks of ``file`` (relative to the repository), in order."""
    blocks: list[Block] = []
    section = ""
    language: str | None = None
    start = 0
    lines: list[str] = []
    for number, line in enumerate((ROOT / file).read_text().splitlines(), start=1):
        fence = _FENCE.match(line)
        if language is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            elif fence:
                language, start, lines = fence.group(1), number, []
        elif fence and not fence.group(1):
            blocks.append(Block(file, start, language, "\n".join(lines) + "\n", section))
            language = None
        else:
            lines.append(line)
    assert language is None, f"{file}: a code block opened at line {start} is never closed"
    return blocks


def _is_setup(block: Block) -> bool:
    return block.file == "README.md" and block.section.startswith("Set up") and "python3 -m venv" in block.code


def _extras() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["optional-dependencies"])


def _check_pip_install(args: str, where: str) -> None:
    """A README ``pip install`` line installs things that exist: local paths and the project's extras."""
    for word in shlex.split(args.split("#", 1)[0]):
        target = re.match(r"^(\.|[\w.-]*hd4k[\w.-]*)\[([\w,-]+)\]$", word)
        if target:
            unknown = set(target.group(2).split(",")) - _extras() if target.group(1) in (".", "hd4k-tools") else set()
            assert not unknown, f"{where}: pip install names extras {unknown} that pyproject.toml does not have"
        local = word.split("[", 1)[0]
        if local.startswith(("integrations/", "./")) or local == ".":
            assert (ROOT / local).exists(), f"{where}: pip install names {local!r}, which is not in the repository"


def _check_pytest(args: str, where: str) -> None:
    for word in shlex.split(args.split("#", 1)[0]):
        if word.startswith("tests"):
            assert (ROOT / word.split("::", 1)[0]).exists(), f"{where}: pytest names {word!r}, which does not exist"


def _bash_script(block: Block) -> str:
    """The block's shell text, with ``pip install`` and ``pytest`` lines checked here and left out."""
    out = []
    for line in block.code.splitlines():
        pip, tests = _PIP_INSTALL.match(line), _PYTEST.match(line)
        if pip and "&&" not in line:
            _check_pip_install(pip.group(1), block.where)
            out.append(f": checked by the README test: {shlex.quote(line)}")
        elif tests:
            _check_pytest(tests.group(1), block.where)
            out.append(f": run by the suite itself: {shlex.quote(line)}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def runnable_blocks() -> tuple[list[Block], list[Block]]:
    """``(to run, skipped)``: the bash and python blocks of :data:`BLOCK_FILES`, in order."""
    run, skipped = [], []
    for file in BLOCK_FILES:
        for block in parse_blocks(file):
            if block.language not in ("bash", "python") or _is_setup(block):
                continue
            (skipped if block.needs else run).append(block)
    return run, skipped


def test_blocks_that_do_not_run_say_why() -> None:
    """The skipped blocks say what they need, in words a reader understands (GPU, checkpoint, vLLM...)."""
    run, skipped = runnable_blocks()
    assert len(run) >= 8, [b.where for b in run]
    for block in skipped:
        assert len(block.needs or "") >= 3, f"{block.where}: '# needs:' without a reason"
    for block in run:  # an unmarked block is run as it is: it must not need what the set-up did not install
        for line in block.code.splitlines():
            stripped = line.strip()
            if stripped.startswith("#") or not stripped:
                continue
            assert not re.match(r"^(hd4k|pip|pytest|jupyter)\b", stripped), (
                f"{block.where}: {stripped!r} needs .venv/bin/ (the set-up never activates the venv)"
            )


def _session(blocks: list[Block], work: Path) -> Path:
    """One bash script that runs ``blocks`` in order (python blocks with .venv/bin/python)."""
    folder = work / ".readme-blocks"
    folder.mkdir()
    lines = [
        "set -eo pipefail",
        # Servers a block started in the background stop with the session.
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
    ]
    for i, block in enumerate(blocks):
        lines.append(f'echo "### {block.where} (at ${{SECONDS}} s)" >&2')
        if block.language == "python":
            path = folder / f"block{i:02d}.py"
            path.write_text(block.code)
            lines.append(f".venv/bin/python {shlex.quote(str(path))}")
        else:
            path = folder / f"block{i:02d}.sh"
            path.write_text(_bash_script(block))
            lines.append(f"source {shlex.quote(str(path))}")
    lines.append('echo "### done (at ${SECONDS} s)" >&2')
    script = folder / "session.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def _copy_of_the_repository(work: Path) -> None:
    ignore = shutil.ignore_patterns(".venv*", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")
    shutil.copytree(ROOT, work, ignore=ignore, dirs_exist_ok=True)
    (work / ".venv").symlink_to(Path(sys.prefix))


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path: Path) -> None:
    """Every runnable block of the READMEs, in order, in one shell session in a copy of the repository."""
    blocks, _ = runnable_blocks()
    work = tmp_path / "repo"
    _copy_of_the_repository(work)
    script = _session(blocks, work)
    before = _files(work)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(venv_bin))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "HD4K_MODEL", "PYTHONPATH")}
    env.update(PATH=path, HF_HUB_OFFLINE="1", HD4K_NO_PROGRESS="1")
    try:  # minutes on an idle 2-core machine; the limit only guards against a hang
        run = subprocess.run(
            ["bash", str(script)], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=1500,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        last = [line for line in stderr.splitlines() if line.startswith("### ")]
        pytest.fail(f"the README session hung in {last[-1] if last else '?'}\n{stderr[-3000:]}")
    last = [line for line in run.stderr.splitlines() if line.startswith("### ")]
    assert run.returncode == 0 and last and last[-1].startswith("### done"), (
        f"README block failed: {last[-1] if last else '?'}\n{run.stderr[-4000:]}\n{run.stdout[-2000:]}"
    )
    # The LlamaIndex example shows a refused path coming back as text for the agent.
    assert "PathNotAllowedError" in run.stdout
    # What the README writes into the repository is ignored by git (no untracked leftovers).
    created = [c for c in _new_paths(before, _files(work)) if not c.startswith(".readme-blocks")]
    assert created, "the README's examples wrote nothing: is the session running?"
    check = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--no-index", "--verbose", "--non-matching", *created],
        capture_output=True,
        text=True,
    )
    not_ignored = [line.split("\t", 1)[1] for line in check.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f"the README leaves these untracked in the repository (add to .gitignore): {not_ignored}"


def _new_paths(before: set[Path], after: set[Path]) -> list[str]:
    """The shortest new paths that hold the new files (``tiny/`` for a new folder, ``examples/x.png`` for
    a new file in an existing one), as ``git check-ignore`` takes them."""
    old_dirs = {parent for path in before for parent in path.parents}
    created = set()
    for path in after - before:
        for depth in range(1, len(path.parts) + 1):
            prefix = Path(*path.parts[:depth])
            if prefix not in old_dirs:
                created.add(str(prefix) + ("/" if depth < len(path.parts) else ""))
                break
    return sorted(created)


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".venv" not in p.parts}
