"""Packaging as the ecosystems expect: the Apache-2.0 LICENSE in every distribution (SPDX string and
``license-files``), classifiers, URLs, authors, ``py.typed``, no ``dev`` extra in the published metadata,
and each partner distribution's own tests on the test path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = [ROOT, *sorted(p.parent for p in (ROOT / "integrations").glob("*/pyproject.toml"))]


def _project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())


def test_six_distributions() -> None:
    assert len(DISTRIBUTIONS) == 6


@pytest.mark.parametrize("folder", DISTRIBUTIONS, ids=lambda p: p.name)
def test_each_distribution_ships_the_license_and_full_metadata(folder: Path) -> None:
    data = _project(folder)
    project = data["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    license_text = (folder / "LICENSE").read_text()
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert "License :: OSI Approved" not in " ".join(project["classifiers"])  # superseded by the SPDX string
    assert "Typing :: Typed" in project["classifiers"]
    assert project["authors"] and project["urls"]
    assert "dev" not in project.get("optional-dependencies", {})
    # setuptools reads `license = "<SPDX>"` and `license-files` from 77 on.
    assert any(req.startswith("setuptools>=77") for req in data["build-system"]["requires"])
    typed = [files for files in data["tool"]["setuptools"]["package-data"].values() if "py.typed" in files]
    assert typed, "py.typed must be package data"


def test_every_distribution_names_the_same_true_addresses() -> None:
    """docs/decisions.md, "Project URLs": the project has no public repository yet, so no distribution names
    a Source, Homepage or Issues address (a guessed one would send users nowhere); all six name the same
    real pages, the paper and the model card, and whoever adds Source adds it to all six."""
    projects = {folder.name: _project(folder)["project"] for folder in DISTRIBUTIONS}
    root = _project(ROOT)["project"]["urls"]
    assert all(project["urls"] == root for project in projects.values()), {k: p["urls"] for k, p in projects.items()}
    assert {"Paper", "Model"} <= set(root)
    assert all(url.startswith("https://") for url in root.values()), root
    # PEP 753's names for the project's own pages: only with the repository's real address.
    assert not {label.lower() for label in root} & {"source", "homepage", "repository", "issues", "documentation"}
    assert all(project["authors"] == _project(ROOT)["project"]["authors"] for project in projects.values())


def test_the_core_is_typed() -> None:
    assert (ROOT / "hd4k_tools" / "py.typed").is_file()


def test_partner_distributions_own_their_tests_and_the_suite_runs_them() -> None:
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    langchain = ROOT / "integrations" / "langchain-hd4k" / "tests"
    assert any((langchain / "unit_tests").glob("test_*.py"))
    assert any((langchain / "integration_tests").glob("test_*.py"))
    for folder in DISTRIBUTIONS[1:]:
        if folder.name == "llama-index-hd4k":  # a meta-package: the three it installs carry the tests
            continue
        assert any((folder / "tests").rglob("test_*.py")), folder.name
        assert str((folder / "tests").relative_to(ROOT)) in testpaths
