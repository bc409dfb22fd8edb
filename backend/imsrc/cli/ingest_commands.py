"""`imsrc index`, `imsrc jobs [show ID]`, `imsrc duplicates`."""

from __future__ import annotations

import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from imsrc.cli.output import err_console, print_json, print_table
from imsrc.cli.progress import JobBar, ctrl_c_stops
from imsrc.errors import InvalidInputError, NotFoundError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
jobs_app = typer.Typer(help="Indexing jobs: list them, or show one with its failures.", invoke_without_command=True)


class Store(StrEnum):
    copy = "copy"
    reference = "reference"


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.add_typer(jobs_app, name="jobs")
    app.command("duplicates")(duplicates)


def index(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Folders (searched recursively) or image files.")],
    category: Annotated[str | None, typer.Option(help="Put every image in this category.")] = None,
    category_from_folder: Annotated[
        bool, typer.Option("--category-from-folder", help="Use each file's parent folder name as its category.")
    ] = False,
    model: Annotated[str | None, typer.Option(help="Model to embed with (default: the catalog's active one).")] = None,
    store: Annotated[
        Store, typer.Option(help="reference: keep file paths; copy: store the bytes too.")
    ] = Store.reference,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default IMSRC_WORKERS; 0 = CPUs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per embedding batch and transaction.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Index image folders: decode, hash, thumbnail and embed in parallel; resumable; duplicates linked."""
    from imsrc.ingest.pipeline import run_index_job
    from imsrc.ingest.scan import check_roots

    if category and category_from_folder:
        raise InvalidInputError("use either --category or --category-from-folder, not both")
    if batch_size is not None and not 1 <= batch_size <= 1024:
        raise InvalidInputError("--batch-size must be between 1 and 1024")
    check_roots(paths)  # a missing path fails before anything is started
    settings = ctx.obj.settings
    db = ctx.obj.database()
    name, embedder = ctx.obj.embedder(model)
    stop = threading.Event()
    with ctrl_c_stops(stop), JobBar(f"indexing ({name})", enabled=not as_json) as bar:
        summary = run_index_job(
            db,
            embedder,
            [str(p) for p in paths],
            category=category,
            category_from_folder=category_from_folder,
            store=store.value,
            workers=settings.workers if workers is None else workers,
            batch_size=batch_size or settings.batch_size,
            stop=stop,
            on_progress=bar,
        )
    regions = None
    if settings.regions and not stop.is_set():
        from imsrc.ingest.embed_regions import embed_regions

        with ctrl_c_stops(stop):
            regions = embed_regions(db, embedder, stop=stop)
        if regions.status == "interrupted":
            summary.status = "interrupted"
    if as_json:
        print_json({**summary.as_dict(), **({"regions": regions.__dict__} if regions else {})})
    else:
        c, r = summary.counts, summary.run_counts
        err_console.print(
            f"job {summary.job_id} {summary.status}{' (resumed)' if summary.resumed else ''}: "
            f"{r['new']} new, {r['duplicate']} near-duplicates, {r['linked']} linked, {r['skipped']} unchanged, "
            f"{r['failed']} failed in {summary.seconds:.1f} s ({summary.files_per_second} files/s)"
            + (f"; job total {sum(c.values())} files" if summary.resumed else "")
            + (f"; {summary.ignored_files} non-image files ignored" if summary.ignored_files else "")
        )
        if r["failed"]:
            err_console.print(f"see the failures with: imsrc jobs show {summary.job_id}")
        if regions:
            err_console.print(
                f"region vectors: {regions.images} images, {regions.failed} failed ({regions.seconds:.1f} s)"
            )
        caps = summary.captions or {}
        if caps.get("sidecars") or caps.get("problems"):
            err_console.print(f"captions: {caps['sidecars']} sidecar files, {caps['captions']} captions changed")
            for problem in caps["problems"][:10]:
                err_console.print(f"caption skipped: {problem['path']}: {problem['reason']}")
    if summary.status == "interrupted":
        err_console.print(f"job {summary.job_id} stopped; run the same command again to continue")
        sys.exit(130)


@jobs_app.callback()
def jobs(
    ctx: typer.Context, limit: Annotated[int, typer.Option(help="How many recent jobs.")] = 20, as_json: JsonOpt = False
) -> None:
    """List recent indexing jobs."""
    if ctx.invoked_subcommand is not None:
        return
    with ctx.obj.reader() as reader:
        rows = reader.recent_jobs(limit)
    cols = [
        "id",
        "kind",
        "status",
        "model_name",
        "files_total",
        "new_count",
        "duplicate_count",
        "linked_count",
        "skipped_count",
        "failed_count",
        "started_at",
        "finished_at",
    ]
    if as_json:
        print_json([{k: r[k] for k in [*cols, "paths", "options", "message"]} for r in rows])
    else:
        print_table(
            [
                "id",
                "kind",
                "status",
                "model",
                "total",
                "new",
                "dup",
                "linked",
                "skipped",
                "failed",
                "started",
                "finished",
            ],
            [[r[k] for k in cols] for r in rows],
            title="Jobs",
        )


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: Annotated[int, typer.Argument(help="Job id (see imsrc jobs).")],
    limit: Annotated[int, typer.Option(help="Most failures to list.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """One job: its options and counts, and every failed file with its reason."""
    from imsrc.ingest.repository import JobRepository

    with ctx.obj.database().session() as session:
        repo = JobRepository(session)
        job = repo.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist (see imsrc jobs)")
        failures = repo.files(job_id, "failed", limit)
    job.pop("job_key", None)
    if as_json:
        print_json({**job, "failures": failures})
        return
    print_table(["field", "value"], [[k, v] for k, v in job.items()], title=f"Job {job_id}")
    if failures:
        print_table(["path", "reason"], [[f["path"], f["reason"]] for f in failures], title="Failures")
    else:
        err_console.print("no failures")


def duplicates(
    ctx: typer.Context,
    recompute: Annotated[bool, typer.Option("--recompute", help="Redo the grouping from the stored hashes.")] = False,
    threshold: Annotated[
        int | None,
        typer.Option(help="pHash Hamming distance for --recompute (default IMSRC_DUPLICATE_THRESHOLD).", min=0, max=64),
    ] = None,
    limit: Annotated[int, typer.Option(help="Most groups to list.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List near-duplicate groups (each canonical image with its duplicates), or regroup them."""
    from imsrc.ingest.duplicates import recompute_duplicates
    from imsrc.ingest.repository import DuplicateRepository

    if threshold is not None and not recompute:
        raise InvalidInputError("--threshold only applies with --recompute")
    db = ctx.obj.database()
    report = None
    if recompute:
        with db.session() as session:
            report = recompute_duplicates(session, db.settings.duplicate_threshold if threshold is None else threshold)
    with db.session() as session:
        repo = DuplicateRepository(session)
        groups, counts = repo.groups(limit), repo.counts()
    if as_json:
        print_json(
            {
                "recomputed": report,
                "group_count": counts["groups"],
                "duplicate_count": counts["duplicates"],
                "groups": groups,
            }
        )
        return
    if report:
        err_console.print(f"regrouped with threshold {report['threshold']}: {report['changed']} images changed")
    print_table(
        ["canonical", "name", "duplicates", "duplicate ids", "distances"],
        [[g["canonical_id"], g["original_name"], g["duplicates"], g["duplicate_ids"], g["distances"]] for g in groups],
        title=f"{counts['groups']} groups, {counts['duplicates']} duplicates",
    )
