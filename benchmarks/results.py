"""What the benchmark scripts share: the CPU's name and writing their own section of RESULTS.md."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\n"
    "Figures from the scripts in `benchmarks/`, run by hand (`.venv/bin/python benchmarks/<script>.py`). "
    "Each section names its machine, versions and date; each script rewrites only its own section.\n"
)


def cpu_name() -> str:
    """The CPU model as ``lscpu`` names it (``platform.processor()`` where lscpu is missing)."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return name
    found = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return found.group(1).strip() if found else name


def write_section(title: str, section: str) -> None:
    """Replace the section headed ``title`` (e.g. ``"## Tiling"``) of RESULTS.md with
    ``section`` (which starts with that heading), or append it; other sections stay untouched."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else HEADER
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")


def _subsection(text: str, title: str) -> re.Match[str] | None:
    """The ``### title`` block of ``text``, up to the next heading of level 2 or 3 (or the end)."""
    return re.search(rf"^{re.escape(title)}\n.*?(?=^### |^## |\Z)", text, re.S | re.M)


def write_subsection(parent: str, title: str, section: str) -> None:
    """Replace the ``### title`` block (``section`` starts with it) inside the ``## parent`` section of
    RESULTS.md, or add it at that section's end; the parent's own script keeps it (see ``keep``)."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else HEADER
    found = _subsection(text, title)
    if found:  # one blank line after the block, whatever the next heading
        text = text[: found.start()] + section.rstrip("\n") + "\n\n" + text[found.end() :]
    else:
        parent_found = re.search(rf"^{re.escape(parent)}\n.*?(?=^## |\Z)", text, re.S | re.M)
        if parent_found is None:
            raise SystemExit(f"RESULTS.md has no {parent!r} section: run its script first")
        body = parent_found.group(0).rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n\n"
        text = text[: parent_found.start()] + body + text[parent_found.end() :]
    RESULTS.write_text(text, encoding="utf-8")


def kept_subsection(title: str) -> str:
    """The ``### title`` block RESULTS.md holds now (empty if none): a ``## `` section's script appends it so
    that rewriting its section keeps a subsection another script measured."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    found = _subsection(text, title)
    return found.group(0).rstrip("\n") + "\n" if found else ""
