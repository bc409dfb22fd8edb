"""`imsrc db start|stop|status|url`: the embedded server (a report only when IMSRC_DATABASE_URL is set)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from imsrc.cli.output import err_console, print_json

if TYPE_CHECKING:  # imported by the commands, so `imsrc --help` does not load the database layer
    from imsrc.db.embedded import EmbeddedServer

app = typer.Typer(help="Manage the embedded PostgreSQL server.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _server(ctx: typer.Context) -> EmbeddedServer | None:
    settings = ctx.obj.settings
    if not settings.embedded:
        return None
    from imsrc.db.embedded import server_for

    return server_for(settings)


def _external_report(ctx: typer.Context, as_json: bool, action: str) -> None:
    from imsrc.db.engine import describe_url

    url = describe_url(ctx.obj.settings.database_url)
    if as_json:
        print_json({"embedded": False, "url": url, "action": "none"})
    else:
        err_console.print(f"IMSRC_DATABASE_URL is set ({url}); `imsrc db {action}` has nothing to do")


@app.command()
def start(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Start the embedded server (and create the imsrc database) if it is not running."""
    server = _server(ctx)
    if server is None:
        return _external_report(ctx, as_json, "start")
    info = server.start()
    if as_json:
        print_json({"embedded": True, "running": True, "pid": info.pid, "url": info.url()})
    else:
        err_console.print(f"embedded PostgreSQL running (pid {info.pid}) with data in {server.pgdata}")
    return None


@app.command()
def stop(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Stop the embedded server."""
    server = _server(ctx)
    if server is None:
        return _external_report(ctx, as_json, "stop")
    stopped = server.stop()
    if as_json:
        print_json({"embedded": True, "stopped": stopped})
    else:
        err_console.print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    return None


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Say whether the embedded server is running, and where its data is."""
    server = _server(ctx)
    if server is None:
        return _external_report(ctx, as_json, "status")
    info = server.info()
    data = {
        "embedded": True,
        "running": info is not None,
        "pid": info.pid if info else None,
        "data_dir": str(server.pgdata),
        "initialised": (server.pgdata / "PG_VERSION").exists(),
        "url": info.url() if info else None,
    }
    if as_json:
        print_json(data)
    elif info:
        err_console.print(f"running (pid {info.pid}), data in {server.pgdata}")
    else:
        err_console.print(f"not running; data in {server.pgdata}")
    return None


@app.command()
def url(ctx: typer.Context) -> None:
    """Print the connection URL (starts the embedded server if needed), e.g. for psql."""
    settings = ctx.obj.settings
    if not settings.embedded:
        typer.echo(settings.database_url)
        return
    server = _server(ctx)
    assert server is not None
    typer.echo(server.start().url())
