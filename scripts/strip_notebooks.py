"""Strip outputs, execution counts and volatile metadata from notebooks before committing them.

Usage::

    python scripts/strip_notebooks.py                 # strip notebooks/*.ipynb in place
    python scripts/strip_notebooks.py a.ipynb b.ipynb # strip the given notebooks
    python scripts/strip_notebooks.py --check         # exit 1 (and list them) if any needs stripping

Only ``nbformat`` is needed (a dev dependency). Cell sources, ids, tags and the kernelspec are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
# Cell metadata written by Jupyter front ends and nbclient when a notebook runs or is viewed.
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime", "jupyter")
VOLATILE_NOTEBOOK_METADATA = ("widgets", "vscode", "toc", "varInspector")


def strip_notebook(nb: Any) -> Any:
    """Return ``nb`` (modified in place) without outputs, execution counts or volatile metadata."""
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    if "language_info" in nb.metadata:
        # Keeps the language, drops the interpreter version and codemirror settings of whoever ran it.
        nb.metadata["language_info"] = {"name": nb.metadata["language_info"].get("name", "python")}
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        elif "attachments" in cell and not cell.attachments:
            del cell["attachments"]
    return nb


def strip_file(path: Path, *, check: bool) -> bool:
    """Strip ``path``; with ``check`` only report. True if the file was (or would be) changed."""
    original = path.read_text(encoding="utf-8")
    nb = strip_notebook(nbformat.reads(original, as_version=4))
    stripped = nbformat.writes(nb) + "\n"
    if stripped == original:
        return False
    if not check:
        path.write_text(stripped, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs stripping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    changed = [path for path in paths if strip_file(path, check=args.check)]
    for path in changed:
        print(f"{'needs stripping' if args.check else 'stripped'}: {path}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
