"""The `imsrc` command. Every command reads the same settings; errors print one line and exit non-zero."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from typing import Annotated, Any, cast

import typer

from imsrc.cli import backup_commands, data_commands, db_commands, ingest_commands, model_commands, search_commands
from imsrc.cli.context import CliContext
from imsrc.cli.output import err_console, print_csv, print_json, print_table
from imsrc.errors import ImsrcError
from imsrc.logs import configure_logging, json_logging

app = typer.Typer(
    name="imsrc",
    help="Self-hosted image similarity search on PostgreSQL + pgvector.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_commands.app, name="db")
app.add_typer(model_commands.app, name="models")
app.command("backup")(backup_commands.backup_command)
app.command("restore")(backup_commands.restore_command)
ingest_commands.register(app)
search_commands.register(app)
data_commands.register(app)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


@app.callback()
def _root(ctx: typer.Context, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    ctx.obj = CliContext()
    configure_logging(ctx.obj.settings.log_format, logging.INFO if verbose else logging.WARNING)


@app.command()
def migrate(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (alembic upgrade head)."""
    db = ctx.obj.database(migrate=True)
    if as_json:
        print_json({"revision": db.revision})
    else:
        err_console.print(f"schema at revision {db.revision}")


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One read-only SQL statement.")],
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    limit: Annotated[int | None, typer.Option(
        help="Print at most this many rows (default: all, streamed); stderr says when rows were left out.",
        min=0)] = None,
) -> None:
    """Run read-only SQL against the catalog as the imsrc_reader role."""
    from imsrc.catalog.readonly_sql import open_readonly, reader_url
    from imsrc.cli.output import stream_json_objects, stream_table

    db = ctx.obj.database()
    cut: list[bool] = []
    with open_readonly(reader_url(ctx.obj.settings, db.url), query) as result:
        rows = result.rows if limit is None else _at_most(result.rows, limit, cut)
        if as_json:
            stream_json_objects(result.columns, rows)
        elif as_csv:
            print_csv(result.columns, rows)
        else:
            stream_table(result.columns, rows)
    if cut:
        err_console.print(f"output cut at {limit} rows (--limit); the query returned more")


def _at_most(rows: Iterator[tuple[Any, ...]], limit: int, cut: list[bool]) -> Iterator[tuple[Any, ...]]:
    """The first `limit` rows; fetching one more tells whether the output was cut (then `cut` gets True)."""
    for n, row in enumerate(rows):
        if n == limit:
            cut.append(True)
            return
        yield row


@app.command()
def stats(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Counts of images, categories, embeddings and models."""
    from imsrc.catalog.repository import StatsRepository

    db = ctx.obj.database()
    with db.session() as session:
        repo = StatsRepository(session)
        data = {"counts": repo.counts(), "models": repo.models(), "schema_revision": db.revision}
    if as_json:
        print_json(data)
        return
    print_table(["what", "count"], [[k, v] for k, v in data["counts"].items()], title="Catalog")
    if data["models"]:
        cols = list(data["models"][0].keys())
        print_table(cols, [[m[c] for c in cols] for m in data["models"]], title="Models")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to bind (default IMSRC_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default IMSRC_PORT, 8000).")] = None,
) -> None:
    """Run the web page and REST API."""
    import socket

    import uvicorn

    from imsrc.api.app import create_app
    from imsrc.api.protocol import GuardedH11Protocol

    settings = ctx.obj.settings
    host = host or settings.host
    port = port or settings.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ImsrcError(f"cannot listen on {host}:{port} ({exc.strerror}); use --port or IMSRC_PORT") from exc
    # Our logging (text or IMSRC_LOG_FORMAT=json, with request ids) replaces uvicorn's own configuration.
    configure_logging(settings.log_format, logging.INFO, server=True)
    db = ctx.obj.database()
    settings = settings.model_copy(update={"host": host, "port": port})
    if json_logging():
        logging.getLogger("imsrc.serve").info("imsrc serving on http://%s:%s", host, port)
    else:
        err_console.print(f"imsrc serving on http://{host}:{port}  (API docs at /docs)")
    # A partial of a module-level class stays picklable for uvicorn's worker processes.
    protocol = functools.partial(GuardedH11Protocol, read_timeout_s=settings.client_timeout_s)
    uvicorn.run(create_app(settings, database=db), host=host, port=port, log_config=None, access_log=False,
                http=cast(Any, protocol))


def main() -> None:
    try:
        app()
    except ImsrcError as exc:
        if json_logging():  # stderr is a stream of JSON lines: keep it one
            logging.getLogger("imsrc").error(exc.message)
            sys.exit(1)
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
