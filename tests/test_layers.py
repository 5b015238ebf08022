"""The imports that import-linter cannot see obey the layers it checks (pyproject.toml, [tool.importlinter]).

A lazy-export table (`tinyseek.lazy.lazy_exports`) and the command table of `tinyseek.cli` name modules as strings:
`from tinyseek import TinySeekForCausalLM` reads like an import of the package but imports tinyseek.modeling. Each
such use must come from a layer above the module the string names, as a plain import would have to."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tinyseek.cli import COMMANDS

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src"


def layer_of() -> dict[str, int]:
    """Top-level module or package (`generate`, `cli`) -> its layer, 0 the lowest."""
    (contract,) = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = list(reversed(contract["layers"]))
    return {name.strip(): index for index, layer in enumerate(layers) for name in layer.split("|")}


def component(module: str) -> str:
    """`tinyseek.generate.engine` -> `generate`."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lazy_tables() -> dict[str, dict[str, str]]:
    """Package -> {exported name: the module it comes from}, read from each `lazy_exports(__name__, {...})` call."""
    tables = {}
    for path in SOURCE.rglob("__init__.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
                tables[module_name(path)] = ast.literal_eval(node.args[1])
    return tables


def string_imports() -> list[tuple[str, str]]:
    """(importing module, module it really imports) for every import through a lazy table, and every command."""
    tables = lazy_tables()
    found = [("tinyseek.cli", module) for module, _ in COMMANDS.values()]
    for path in SOURCE.rglob("*.py"):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in tables:
                found += [(importer, tables[node.module][alias.name]) for alias in node.names
                          if alias.name in tables[node.module]]
    return found


def test_the_lazy_tables_are_found():
    tables = lazy_tables()
    assert {"tinyseek", "tinyseek.train", "tinyseek.data", "tinyseek.generate"} <= set(tables)
    assert tables["tinyseek"]["TinySeekForCausalLM"] == "tinyseek.modeling"


def test_imports_through_lazy_tables_and_commands_go_down_the_layers():
    layers = layer_of()
    upward = [
        f"{importer} -> {target}" for importer, target in string_imports()
        if component(importer) != component(target)
        and component(importer) in layers and layers[component(importer)] <= layers[component(target)]
    ]
    assert not upward, "imports through a string table that go up or sideways: " + "; ".join(sorted(set(upward)))


def test_the_check_sees_an_upward_import():
    layers = layer_of()
    # What the check above would report: the model importing the trainer through tinyseek.train's table.
    assert layers[component("tinyseek.modeling")] <= layers[component(lazy_tables()["tinyseek.train"]["load_config"])]
