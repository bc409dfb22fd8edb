"""`imsrc models list|add|use|remove`."""

from __future__ import annotations

from typing import Annotated

import typer

from imsrc.cli.output import err_console, print_json, print_table

app = typer.Typer(help="Embedding models: list, add, switch, remove.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


@app.command("list")
def list_models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Known models: dimension, text support, whether weights are present, this catalog's progress, and the
    inference engine (IMSRC_INFERENCE) each runs on."""
    from imsrc.services.models import ModelService

    db = ctx.obj.database()
    with db.session() as session:
        rows = ModelService(session, ctx.obj.settings).overview()
    if as_json:
        print_json(rows)
        return
    cols = ["name", "dimension", "text", "weights_present", "in_catalog", "active", "embedded", "inference"]
    heads = ["name", "dim", "text", "weights", "in catalog", "active", "embedded", "inference"]
    print_table(heads, [[_yes_no(r[c]) for c in cols] for r in rows])


def _yes_no(value: object) -> object:
    return ("yes" if value else "no") if isinstance(value, bool) else value


@app.command()
def add(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Register a model in this catalog (not active yet); then run `imsrc embed --model NAME`."""
    from imsrc.services.models import ModelService

    db = ctx.obj.database()
    with db.session() as session:
        model = ModelService(session, ctx.obj.settings).add(name)
        data = {"name": model.name, "dimension": model.dimension, "active": model.is_active}
    if as_json:
        print_json(data)
    else:
        err_console.print(f"added {data['name']} ({data['dimension']}-d); fill it with `imsrc embed --model {name}`")


@app.command()
def use(
    ctx: typer.Context,
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Switch even if some images are not embedded yet.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make NAME the active model (only once it has embedded every image, unless --force)."""
    from imsrc.services.models import ModelService

    db = ctx.obj.database()
    with db.session() as session:
        model = ModelService(session, ctx.obj.settings).use(name, force=force)
        data = {"name": model.name, "active": True}
    if as_json:
        print_json(data)
    else:
        err_console.print(f"active model is now {name}")


@app.command()
def remove(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Remove a model's vectors, prototypes and index from this catalog (images stay)."""
    from imsrc.services.models import ModelService

    db = ctx.obj.database()
    with db.session() as session:
        ModelService(session, ctx.obj.settings).remove(name)
    if as_json:
        print_json({"removed": name})
    else:
        err_console.print(f"removed model {name} and its vectors")
