"""Code comments cite the model's facts as ``docs/model.md §N``; every such reference must name a section
heading that exists in docs/model.md, and no comment may still cite the out-of-repo spec."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "model.md"
SCANNED = ("hd4k_tools", "integrations", "benchmarks", "tests")
SKIPPED_PARTS = {".venv", "venv", "site-packages", "build", "dist", "__pycache__", "node_modules"}

SECTION = r"§(\d+(?:\.\d+)*)"
HEADING = re.compile(r"^#{1,6}\s+" + SECTION + r"(?!\d)", re.M)
# "docs/model.md §3.2", also lists and ranges such as "docs/model.md §1, §2" or "docs/model.md §1.2–§1.8".
DOC_REF = re.compile(r"docs/model\.md\s*(§[\d.]+(?:\s*(?:,|–|-|and|or)\s*§[\d.]+)*)")
# The old reference to the out-of-repo spec (any case); built in pieces so this file does not match itself.
OLD_REF = re.compile(r"\bspec " + "§" + r"|ixc2_4khd" + r"\.md", re.IGNORECASE)


def _python_files() -> list[Path]:
    me = Path(__file__).resolve()
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.resolve() == me or SKIPPED_PARTS.intersection(path.relative_to(ROOT).parts):
                continue
            files.append(path)
    return files


def _sections() -> set[str]:
    return set(HEADING.findall(DOC.read_text(encoding="utf-8")))


def _doc_references() -> list[tuple[str, int, str]]:
    """(file, line, section) for every ``docs/model.md §N`` in the scanned Python files."""
    refs = []
    for path in _python_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for group in DOC_REF.findall(line):
                for number in re.findall(SECTION, group):
                    refs.append((str(path.relative_to(ROOT)), lineno, number))
    return refs


def test_doc_has_numbered_sections() -> None:
    headings = HEADING.findall(DOC.read_text(encoding="utf-8"))
    assert len(headings) == len(set(headings)), f"duplicate section numbers in {DOC.name}: {sorted(headings)}"
    for required in ("1", "1.1", "1.9", "2", "3.2", "3.3", "3.4", "4", "5"):
        assert required in headings, f"{DOC.name} has no heading §{required}"


def test_every_doc_reference_names_an_existing_section() -> None:
    sections = _sections()
    missing = [f"{file}:{line}: §{number}" for file, line, number in _doc_references() if number not in sections]
    assert not missing, "references to sections docs/model.md does not have:\n" + "\n".join(missing)


def test_no_python_file_cites_the_out_of_repo_spec() -> None:
    stale = []
    for path in _python_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OLD_REF.search(line):
                stale.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not stale, "cite docs/model.md §N instead of the out-of-repo spec:\n" + "\n".join(stale)
