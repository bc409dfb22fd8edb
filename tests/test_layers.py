"""The package's layers (README, "Architecture"): each one imports only itself and the layers below it, at module
level or inside a function, so the write path cannot grow a cycle back (issue 13). Read from the source's AST,
so an import hidden in a function or behind TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "backend" / "imsrc"

# Lowest first. A module may import from its own layer and any layer with a smaller number.
LAYERS: dict[str, int] = {
    # the foundation: settings, domain errors, logging, package resources, the image formats and the bounded
    # decoder (uploads, search queries and folder jobs all decode through imaging)
    "__init__": 0,
    "config": 0,
    "errors": 0,
    "logs": 0,
    "resources": 0,
    "formats": 0,
    "imaging": 0,
    "timings": 0,  # per-request stage times (the upload route's Server-Timing header)
    "db": 1,  # engine, sessions, the embedded server, what database errors mean
    "embeddings": 2,  # models behind one protocol; embeddings.loading.load_embedder loads them all
    "catalog": 3,  # ORM models, repositories (all SQL for images, categories, prototypes, models), read services
    "search": 4,  # prototypes, stage 1 and 2, and search.sync.sync_search, the one "bring search up to date"
    "services": 5,  # writes that keep search in step (categories, image deletes, models)
    "ingest": 6,  # getting images in: folder jobs, uploads, `imsrc embed`
    "api": 7,  # FastAPI routes: parse, call a service, shape the answer
    "cli": 8,  # Typer commands (`imsrc serve` starts the API)
}


def _layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "imsrc", module
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] if len(parts) > 1 else ["imsrc", "__init__"]
        yield ".".join(parts), path


def _imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import anywhere in the file; relative ones resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:  # `from imsrc import api` imports the package imsrc.api
                yield node.lineno, f"{base}.{alias.name}"


MODULES = dict(_modules())


def test_every_module_has_a_layer() -> None:
    assert {_layer_of(m) for m in MODULES} <= set(LAYERS), "add the new package to LAYERS (and the README)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_never_up(module: str) -> None:
    own = LAYERS[_layer_of(module)]
    upward = []
    for line, target in _imports(module, MODULES[module]):
        if target.split(".")[0] != "imsrc" or (target not in MODULES and target.rsplit(".", 1)[0] not in MODULES):
            continue  # a third-party module, or a name (not a module) taken from an imsrc module
        name = target if target in MODULES else target.rsplit(".", 1)[0]
        layer = _layer_of(name)
        if LAYERS[layer] > own:
            upward.append(f"line {line}: {name} ({layer}, above {_layer_of(module)})")
    assert not upward, f"{module} imports a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer_of(m) == "api"))
def test_the_api_knows_no_database_driver(module: str) -> None:
    # What a database error means is the database layer's business (imsrc.db.errors.classify).
    for line, target in _imports(module, MODULES[module]):
        assert not (target == "psycopg" or target.startswith("psycopg.")), f"{module}:{line} imports {target}"
        assert target != "sqlalchemy.exc.DBAPIError", f"{module}:{line} imports DBAPIError"


def _calls(module: str, names: set[str]) -> list[str]:
    found = []
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in names:
                found.append(f"{module}:{node.lineno} {name}()")
    return found


def test_one_function_loads_a_model() -> None:
    # Everyone asks embeddings.loading.load_embedder (directly, or through services.models.choose_and_load or a
    # search runtime's factory), so settings such as device, precision and engine apply everywhere alike.
    stray = [
        c
        for m in MODULES
        if not m.startswith("imsrc.embeddings")
        for c in _calls(m, {"get_embedder", "build_embedder"})
    ]
    assert stray == []


def test_one_entry_point_brings_search_up_to_date() -> None:
    # The steps of a sync are search.sync's own; every write path calls sync_search instead.
    steps = {"recompute_means", "refresh_prototypes", "autogroup", "ensure_category_indexes", "predict_uncategorised"}
    stray = [
        c
        for m in MODULES
        if m not in ("imsrc.search.sync", "imsrc.search.prototypes", "imsrc.search.autogroup")
        for c in _calls(m, steps)
    ]
    assert stray == []
