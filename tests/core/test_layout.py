"""The package's shape (issue 10): no import cycles, imports at module top except for optional extras,
and the documented public names importable where the README and earlier issues put them."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hd4k_tools"

# Packages a module may import inside a function: optional extras (and torch, which the torch-free
# light paths must not import at module import time).
OPTIONAL = {
    "bitsandbytes",
    "fastapi",
    "huggingface_hub",
    "IPython",
    "llguidance",
    "mcp",
    "pyarrow",
    "safetensors",
    "pypdfium2",
    "ray",
    "sse_starlette",
    "starlette",
    "torch",
    "tqdm",
    "transformers",
    "uvicorn",
    "vllm",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported (module body, if/try blocks; not TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                found.append(stmt)
            elif isinstance(stmt, ast.If):
                if "TYPE_CHECKING" in ast.unparse(stmt.test):
                    continue
                walk(stmt.body)
                walk(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                walk(stmt.body)
                for handler in stmt.handlers:
                    walk(handler.body)

    walk(tree.body)
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        deps = set()
        for node in _top_level_imports(tree):
            for target in _imported(node):
                # ``from pkg import submodule`` imports pkg.submodule; ``from pkg import name`` imports pkg.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    deps.add(target)
        graph[name] = deps

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _needs_extra(tree: ast.Module) -> bool:
    """A module of ours that imports an optional extra at its top (torch: the ``local`` extra)."""
    return any(t.split(".")[0] in OPTIONAL for n in _top_level_imports(tree) for t in _imported(n) if t)


def test_imports_inside_functions_only_for_optional_extras() -> None:
    offenders = []
    modules = _modules()
    # Our own modules that need an extra may be imported lazily too (e.g. the tiny checkpoint, torch).
    extra_modules = {name for name, tree in modules.items() if _needs_extra(tree)}
    for name, tree in modules.items():
        top = {id(n) for n in _top_level_imports(tree)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                if isinstance(node, ast.ImportFrom) and node.level:
                    offenders.append(f"{name}:{node.lineno} relative import")
                    continue
                roots = {t.split(".")[0] for t in _imported(node) if t}
                in_type_checking = False  # TYPE_CHECKING blocks were skipped by _top_level_imports
                for parent in ast.walk(tree):
                    guarded = isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test)
                    if guarded and any(child is node for child in ast.walk(parent)):
                        in_type_checking = True
                ours = {t for t in _imported(node) if t in modules}
                if in_type_checking or roots <= OPTIONAL or (ours and ours <= extra_modules):
                    continue
                offenders.append(f"{name}:{node.lineno} imports {sorted(roots)}")
    assert not offenders, "imports inside functions (not optional extras):\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("hd4k_tools.tiling", ["plan", "hd_transform", "to_model_inputs", "auto_hd_num", "draw_plan", "HDPlan"]),
        ("hd4k_tools.imaging", ["load_image", "ImagePolicy", "read_source_bytes"]),
        ("hd4k_tools.testing", ["make_tiny_checkpoint"]),
        ("hd4k_tools.errors", ["HD4KError", "InputError", "ContextOverflowError"]),
        ("hd4k_tools", ["HD4K", "ToolSettings", "AgentTools", "LocalRunner", "RemoteRunner", "GenerationConfig"]),
        ("hd4k_tools.cli", ["main"]),
        ("langchain_hd4k", ["ChatHD4K", "HD4KToolkit", "HD4KDocumentLoader"]),
        ("llama_index_hd4k", ["HD4KToolSpec", "HD4KMultiModalLLM", "HD4KReader"]),
    ],
)
def test_documented_public_names_stay_importable(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.{name} is documented public API"


# The documented re-export modules (and the package's lazy exports) may name the model family's folder;
# everything else reaches a family through models/registry.py (issue 18 item 2).
FAMILY_REEXPORTS = {"hd4k_tools", "hd4k_tools.tiling", "hd4k_tools.imaging", "hd4k_tools.testing"}


def test_nothing_outside_models_imports_a_family_folder() -> None:
    offenders = []
    for name, tree in _modules().items():
        if name.startswith("hd4k_tools.models") or name in FAMILY_REEXPORTS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node):
                    if target.startswith("hd4k_tools.models.") and not target.startswith("hd4k_tools.models.registry"):
                        offenders.append(f"{name}:{node.lineno} imports {target}")
    integrations = PACKAGE.parent / "integrations"
    for path in sorted(integrations.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node):
                    if target.startswith("hd4k_tools.models"):
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not offenders, "imports of a model family outside models/ (use models.registry):\n" + "\n".join(offenders)


def test_cli_helpers_live_outside_the_family_and_no_arrow_runs_back_up() -> None:
    """``--model`` and ``--hd-num`` are in the neutral ``hd4k_tools.arguments``; the family folder holds no
    argparse, ingestion does not import the ``hd4k`` CLI, and the vLLM processor does not import the facade."""
    modules = _modules()
    for name, tree in modules.items():
        targets = [t for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for t in _imported(n)]
        if name.startswith("hd4k_tools.models"):
            assert "argparse" not in targets, name
            assert not any(t.startswith("hd4k_tools.hd4k") for t in targets), name
        if name.startswith("hd4k_tools.ingestion"):
            assert not any(t.startswith("hd4k_tools.cli") for t in targets), name
    from hd4k_tools.arguments import add_model_argument, parse_hd_num

    assert callable(add_model_argument) and parse_hd_num("auto") == "auto"


MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines() -> None:
    """Issue 18 item 5: every function (docstring included) reads in one screen; split longer ones into
    well-named helpers in the same file."""
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py")]
    for dist in sorted((root / "integrations").glob("*")):
        if dist.is_dir():
            files += [f for f in dist.rglob("*.py") if "tests" not in f.parts and not f.name.startswith("test_")]
    assert len(files) > 50, "the walk found too few files: the paths above are wrong"
    too_long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(too_long)
