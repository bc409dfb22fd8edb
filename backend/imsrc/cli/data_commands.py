"""`imsrc embed --model NAME` and `imsrc demo`."""

from __future__ import annotations

import sys
import threading
from typing import Annotated

import typer

from imsrc.cli.output import err_console, print_json, print_table
from imsrc.cli.progress import JobBar, ctrl_c_stops
from imsrc.errors import InvalidInputError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
    app.command("demo")(demo)


def embed(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            help="The model whose missing vectors to compute (registered if new);"
            " with --regions, default the active one."
        ),
    ] = None,
    regions: Annotated[
        bool,
        typer.Option(
            "--regions", help="Add region (window) vectors for match=partial to images that lack them (resumable)."
        ),
    ] = False,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default IMSRC_WORKERS; 0 = CPUs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per embedding batch and transaction.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compute a model's missing embeddings (or, with --regions, region vectors) from stored originals or
    referenced files (resumable: run it again after a stop)."""
    from imsrc.ingest.embed_missing import embed_missing

    if regions:
        _embed_regions(ctx, model, as_json)
        return
    if model is None:
        raise InvalidInputError("--model is required (or use --regions to add region vectors for the active model)")

    settings = ctx.obj.settings
    db = ctx.obj.database()
    name, embedder = ctx.obj.embedder(model)
    stop = threading.Event()
    with ctrl_c_stops(stop), JobBar(f"embedding ({name})", enabled=not as_json) as bar:
        summary = embed_missing(
            db,
            embedder,
            workers=settings.workers if workers is None else workers,
            batch_size=batch_size or settings.batch_size,
            stop=stop,
            on_progress=bar,
        )
    if as_json:
        print_json(summary.__dict__)
    else:
        err_console.print(
            f"{name}: {summary.embedded} embedded, {summary.failed} failed, {summary.remaining} "
            f"still missing ({summary.seconds:.1f} s)"
        )
        if summary.failures:
            shown = summary.failures[:50]
            print_table(
                ["image", "reason"],
                [[f["image"], f["reason"]] for f in shown],
                title="Failures"
                if len(shown) == summary.failed
                else f"Failures (the first {len(shown)} of {summary.failed}; --json lists them all)",
            )
    if summary.status == "interrupted":
        err_console.print("stopped; run the same command again to continue")
        sys.exit(130)


def _embed_regions(ctx: typer.Context, model: str | None, as_json: bool) -> None:
    from imsrc.ingest.embed_regions import embed_regions
    from imsrc.ingest.pipeline import JobProgress
    from imsrc.ingest.service import OUTCOMES

    db = ctx.obj.database()
    name, embedder = ctx.obj.embedder(model)
    stop = threading.Event()
    with ctrl_c_stops(stop), JobBar(f"regions ({name})", enabled=not as_json) as bar:
        summary = embed_regions(
            db,
            embedder,
            stop=stop,
            on_progress=lambda done, total: bar(
                JobProgress(job_id=0, total=total, done=done, counts={**dict.fromkeys(OUTCOMES, 0), "new": done})
            ),
        )
    if as_json:
        print_json(summary.__dict__)
    else:
        err_console.print(
            f"{name}: region vectors for {summary.images} images ({summary.regions} windows, "
            f"{summary.windows_per_image} per image), {summary.failed} failed, {summary.remaining} "
            f"still missing ({summary.seconds:.1f} s)"
        )
        if summary.failures:
            print_table(
                ["image", "reason"], [[f["image"], f["reason"]] for f in summary.failures[:50]], title="Failures"
            )
    if summary.status == "interrupted":
        err_console.print("stopped; run the same command again to continue")
        sys.exit(130)


def demo(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="fashion-mnist or cifar10.")] = "fashion-mnist",
    limit: Annotated[int, typer.Option(help="Images to load (0 = the whole 10,000-image test split).", min=0)] = 2000,
    model: Annotated[str | None, typer.Option(help="Model to embed with (default: the catalog's active one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Load a real labelled dataset, its class names as categories (bytes stored in the database)."""
    from imsrc.ingest.demo import DATASETS, load_dataset

    if dataset not in DATASETS:
        raise InvalidInputError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    from imsrc.ingest.pipeline import JobSpec, run_job

    settings = ctx.obj.settings
    data = load_dataset(dataset, settings.resolved_data_dir / "datasets")
    db = ctx.obj.database()
    name, embedder = ctx.obj.embedder(model)
    n = len(data.images) if not limit else min(limit, len(data.images))
    spec = JobSpec(
        kind="demo",
        paths=[dataset],
        options={"dataset": dataset, "limit": n},
        items=lambda: data.items(n),
        count=lambda: n,
        store_bytes=True,
        workers=settings.workers,
        batch_size=settings.batch_size,
    )
    stop = threading.Event()
    with ctrl_c_stops(stop), JobBar(f"{dataset} ({name})", enabled=not as_json) as bar:
        summary = run_job(db, embedder, spec, stop=stop, on_progress=bar)
    if as_json:
        print_json({**summary.as_dict(), "dataset": dataset, "source": data.source, "classes": data.classes})
    else:
        r = summary.run_counts
        err_console.print(
            f"{dataset} from {data.source}: {r['new']} new, {r['duplicate']} near-duplicates, "
            f"{r['linked']} already there, {r['failed']} failed, in {len(data.classes)} categories "
            f"({summary.seconds:.1f} s)"
        )
    if summary.status == "interrupted":
        err_console.print("stopped; run the same command again to continue")
        sys.exit(130)
