"""The `imsrc` command. Every command reads the same settings; errors print one line and exit non-zero."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from imsrc.cli import (
    backup_commands,
    caption_commands,
    data_commands,
    db_commands,
    ingest_commands,
    model_commands,
    search_commands,
)
from imsrc.cli.context import CliContext
from imsrc.cli.output import err_console, print_csv, print_json, print_table
from imsrc.errors import ImsrcError
from imsrc.logs import configure_logging, json_logging

try:  # Typer 0.2x carries its own copy of click; older Typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]

if TYPE_CHECKING:
    from imsrc.config import Settings
    from imsrc.db.session import Database

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
caption_commands.register(app)
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
    limit: Annotated[
        int | None,
        typer.Option(
            help="Print at most this many rows (default: all, streamed); stderr says when rows were left out.", min=0
        ),
    ] = None,
) -> None:
    """Run read-only SQL against the catalog as the imsrc_reader role."""
    from imsrc.catalog.readonly_sql import open_readonly, reader_url
    from imsrc.cli.output import stream_json_objects, stream_table

    with ctx.obj.direct() as direct:  # the server started and the schema current, as for every command
        owner_url = direct.url
    cut: list[bool] = []
    with open_readonly(reader_url(ctx.obj.settings, owner_url), query) as result:
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
    from imsrc.catalog.reader import CatalogReader

    with ctx.obj.direct() as direct:
        repo = CatalogReader(direct.conn)
        data = {"counts": repo.counts(), "models": repo.models(), "schema_revision": direct.revision}
    if as_json:
        print_json(data)
        return
    print_table(["what", "count"], [[k, v] for k, v in data["counts"].items()], title="Catalog")
    if data["models"]:
        cols = list(data["models"][0].keys())
        print_table(cols, [[m[c] for c in cols] for m in data["models"]], title="Models")


MAX_HTTP_WORKERS = 64


def _cores() -> int:
    """CPU cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to bind (default IMSRC_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default IMSRC_PORT, 8000).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="API worker processes on the one port (default IMSRC_WORKERS_HTTP; 0 there = one per CPU core)."
        ),
    ] = None,
) -> None:
    """Run the web page and REST API."""
    import socket

    settings = ctx.obj.settings
    host = host or settings.host
    # Checked here: bind() raises OverflowError, not OSError, for a port out of range.
    if port is not None and not 1 <= port <= 65535:
        raise ImsrcError(f"--port must be between 1 and 65535 (got {port})")
    port = port or settings.port
    if workers is not None and not 1 <= workers <= MAX_HTTP_WORKERS:
        raise ImsrcError(f"--workers must be between 1 and {MAX_HTTP_WORKERS} (got {workers})")
    count = workers or settings.workers_http or min(_cores(), MAX_HTTP_WORKERS)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ImsrcError(f"cannot listen on {host}:{port} ({exc.strerror}); use --port or IMSRC_PORT") from exc
    # Our logging (text or IMSRC_LOG_FORMAT=json, with request ids) replaces uvicorn's own configuration.
    configure_logging(settings.log_format, logging.INFO, server=True)
    # Here, once, before any worker: start the embedded server if needed and bring the schema to head, so N
    # workers do not race to migrate.
    db = ctx.obj.database()
    settings = settings.model_copy(update={"host": host, "port": port})
    workers_note = f", {count} worker processes" if count > 1 else ""
    if json_logging():
        logging.getLogger("imsrc.serve").info("imsrc serving on http://%s:%s%s", host, port, workers_note)
    else:
        err_console.print(f"imsrc serving on http://{host}:{port}{workers_note}  (API docs at /docs)")
    if count == 1:
        _run_uvicorn(settings, app=_single_app(settings, db), workers=1)
    else:
        db.dispose()  # each worker opens its own pool; the parent only supervises
        _serve_workers(settings, count, db.url)


def _single_app(settings: Settings, db: Database) -> Any:
    from imsrc.api.app import create_app

    return create_app(settings, database=db)


def _run_uvicorn(settings: Settings, *, app: Any, workers: int) -> None:
    import uvicorn

    from imsrc.api.protocol import GuardedH11Protocol

    # A partial of a module-level class stays picklable for uvicorn's worker processes.
    protocol = functools.partial(GuardedH11Protocol, read_timeout_s=settings.client_timeout_s)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        http=cast(Any, protocol),
        workers=workers,
        factory=workers > 1,
    )


def _serve_workers(settings: Settings, count: int, database_url: str) -> None:
    """N processes on one port with uvicorn's own supervisor (not gunicorn): no second server to install or
    configure, the same h11 protocol class and settings as one process, and since uvicorn 0.30 the supervisor
    restarts a worker that dies and passes SIGTERM on to every worker, which finish their requests in flight.
    The parent binds the socket and the spawned workers share it; each builds its app from the environment
    (imsrc.api.worker), so the host and port chosen here go there first."""
    import shutil
    import tempfile

    os.environ["IMSRC_HOST"] = settings.host
    os.environ["IMSRC_PORT"] = str(settings.port)
    # The model's threads (torch and ONNX Runtime both follow OMP_NUM_THREADS): one worker alone would use every
    # core, so N workers would run N x cores threads that preempt each other mid-inference. Cores / N each, unless
    # the operator chose.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // count)))
    from imsrc.api.worker import DATABASE_URL_ENV

    os.environ[DATABASE_URL_ENV] = database_url
    # Prometheus counters of N processes: kept in files in one folder, summed at /metrics (api.metrics). The
    # folder must be empty at start, so unless the operator named one, a fresh one that goes away afterwards.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="imsrc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        _run_uvicorn(settings, app="imsrc.api.worker:worker_app", workers=count)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _usage_error(exc: click_errors.UsageError) -> None:
    """A wrong option or argument: one line, like every other CLI error (Typer would draw a multi-line box)."""
    if isinstance(exc, click_errors.NoArgsIsHelpError) and exc.ctx is not None:
        print(exc.ctx.get_help())  # `imsrc` or `imsrc db` alone: the help and exit status 2, as before
        sys.exit(exc.exit_code)
    where = exc.ctx.command_path if exc.ctx is not None else "imsrc"
    message = " ".join(exc.format_message().split())
    err_console.print(f"[red]error:[/red] {message} (see '{where} --help')", highlight=False, soft_wrap=True)
    sys.exit(exc.exit_code)


def main() -> None:
    try:
        # standalone_mode=False: click hands usage errors and exit codes back to us instead of printing them.
        result = app(standalone_mode=False)
        if isinstance(result, int) and result:
            sys.exit(result)
    except click_errors.UsageError as exc:
        _usage_error(exc)
    except typer.Abort:  # Ctrl-C at a prompt, or click turning KeyboardInterrupt into Abort
        err_console.print("interrupted")
        sys.exit(130)
    except click_errors.ClickException as exc:  # e.g. a file option that cannot be opened
        err_console.print(f"[red]error:[/red] {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
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
