"""Every kind of bad input is recorded as failed with its reason, and the rest of the run goes on."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from imsrc.db.session import Database
from imsrc.embeddings.registry import get_embedder
from imsrc.errors import ImsrcError
from imsrc.ingest.decode import DecodeOptions, WorkItem, process
from imsrc.ingest.pipeline import JobSpec, run_index_job, run_job
from imsrc.ingest.scan import check_roots, scan
from tests.ingest_support import TEST_MODEL, make_image, open_test_database, write


@pytest.fixture()
def db(create_database, scratch: Path) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    # A low pixel limit so "too big" needs only a 200x200 image; the good images are 60x60.
    database = open_test_database(create_database("imsrc_bad"), scratch / "data", max_pixels=20_000)
    yield database
    database.dispose()


def test_bad_files_are_recorded_and_the_run_goes_on(db: Database, scratch: Path) -> None:
    root = scratch / "bad"
    png = make_image(1, (60, 60), "PNG")
    jpeg = make_image(2, (60, 60), "JPEG")
    write(root / "good.png", png)
    write(root / "corrupt.png", png[:16] + bytes(range(256)) * 4)  # valid signature, garbage after it
    write(root / "truncated.jpg", jpeg[: len(jpeg) // 2])
    write(root / "empty.jpg", b"")
    write(root / "text.jpg", b"Dear diary, today I was not a JPEG.\n")
    write(root / "huge.png", make_image(3, (200, 200), "PNG"))  # 40,000 px > 20,000
    os.mkfifo(root / "fifo.jpg")  # an unreadable "file": root can read anything, but not a FIFO as an image
    os.symlink(root / "missing-target.png", root / "dangling.png")
    latin1 = os.fsencode(str(root)) + b"/caf\xe9.png"
    with open(latin1, "wb") as fh:
        fh.write(make_image(4, (60, 60)))
    doomed = write(root / "zz-doomed.png", make_image(5, (60, 60)))
    write(root / "zz-last.png", make_image(6, (60, 60), "PNG"))

    def items() -> Iterator[WorkItem]:
        # Delete one file after the scan has listed it and before a worker reads it: "deleted mid-run".
        for item in scan(check_roots([root])):
            yield item
            if item.path == str(doomed):
                doomed.unlink()

    spec = JobSpec(
        kind="index",
        paths=[str(root)],
        options={"test": "bad"},
        items=items,
        count=None,
        store_bytes=False,
        workers=1,
        batch_size=4,
    )
    summary = run_job(db, get_embedder(TEST_MODEL), spec)
    assert summary.status == "completed"
    with db.engine.connect() as conn:
        reasons = dict(conn.execute(text("SELECT path, reason FROM ingest_files WHERE outcome = 'failed'")).all())
        stored = set(conn.execute(text("SELECT original_name FROM images")).scalars())
    name = {Path(p).name if "\\x" not in p else "latin1": r for p, r in reasons.items()}
    assert stored == {"good.png", "zz-last.png"}
    assert summary.run_counts == {"new": 2, "duplicate": 0, "linked": 0, "skipped": 0, "failed": 9}
    assert name["corrupt.png"].startswith("corrupt or truncated image data")
    assert name["truncated.jpg"].startswith("corrupt or truncated image data")
    assert name["empty.jpg"] == "empty file (0 bytes)"
    assert name["text.jpg"].startswith("not a recognised image format")
    assert name["huge.png"] == "image is 200x200 = 40000 pixels, over the limit of 20000 (IMSRC_MAX_PIXELS)"
    assert name["fifo.jpg"] == "not a regular file (a FIFO)"
    assert name["dangling.png"] == "broken symbolic link (its target does not exist)"
    assert name["latin1"] == "file name is not valid UTF-8; rename the file to index it"
    assert str(root) + "/caf\\xe9.png" in reasons  # recorded under an escaped, valid UTF-8 path
    assert name["zz-doomed.png"] == "file disappeared before it could be read"


def test_permission_denied_is_a_reason(scratch: Path) -> None:
    """chmod 000 stops nobody when tests run as root (CAP_DAC_OVERRIDE), so as root the read happens in
    a forked child that has dropped to the unprivileged user 65534 (nobody); as a normal user, directly."""
    target = write(scratch / "locked.png", make_image(7, (40, 40)))
    target.chmod(0)
    scratch.chmod(0o755)
    options = DecodeOptions(preprocess=None, max_pixels=10**8)
    if os.geteuid() != 0:
        result = process(WorkItem(key=str(target), path=str(target)), options)
        assert (result.ok, result.reason) == (False, "permission denied: the file cannot be read")
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = process(WorkItem(key=str(target), path=str(target)), options)
            os.write(write_end, json.dumps([result.ok, result.reason]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        answer = fh.read()
    os.waitpid(pid, 0)
    assert json.loads(answer) == [False, "permission denied: the file cannot be read"]


def test_database_error_mid_job_keeps_earlier_batches_and_fails_cleanly(db: Database, scratch: Path) -> None:
    root = scratch / "poison"
    for i in range(60):
        write(root / f"img{i:02d}.png", make_image(700 + i, (40, 40)))
    write(root / "img30.png", make_image(799, (40, 40)))
    with db.engine.begin() as conn:  # the database refuses one row, as a full disk or a constraint would
        conn.execute(
            text(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.original_name = 'img30.png' THEN RAISE EXCEPTION 'disk full (simulated)'; END IF;"
                " RETURN NEW; END $$;"
                " CREATE TRIGGER poison BEFORE INSERT ON images FOR EACH ROW EXECUTE FUNCTION poison()"
            )
        )
    with pytest.raises(ImsrcError, match=r"stopped on a database error .*disk full \(simulated\)"):
        run_index_job(db, get_embedder(TEST_MODEL), [str(root)], workers=2, batch_size=8, inline_below=0)
    with db.engine.connect() as conn:
        status, message = conn.execute(text("SELECT status, message FROM ingest_jobs")).one()
        names = set(conn.execute(text("SELECT original_name FROM images")).scalars())
        orphans = conn.execute(
            text(
                "SELECT count(*) FROM images i WHERE NOT EXISTS (SELECT 1 FROM thumbnails t"
                " WHERE t.image_id = i.id) OR NOT EXISTS (SELECT 1 FROM embeddings e"
                " WHERE e.image_id = i.id)"
            )
        ).scalar()
    assert status == "failed" and "disk full" in message
    assert names == {f"img{i:02d}.png" for i in range(24)}  # three whole batches of 8, nothing of the fourth
    assert orphans == 0


def test_scan_skips_database_folders(scratch: Path) -> None:
    """`imsrc index .` where ./data lives must not walk the embedded cluster (or any PostgreSQL data folder)."""
    write(scratch / "photos" / "a.png", make_image(1, (32, 32)))
    (scratch / "data" / "pg").mkdir(parents=True)
    (scratch / "data" / "pg" / "PG_VERSION").write_text("18\n")
    write(scratch / "data" / "thumb.png", make_image(2, (32, 32)))
    (scratch / "cluster").mkdir()
    (scratch / "cluster" / "PG_VERSION").write_text("18\n")
    write(scratch / "cluster" / "x.png", make_image(3, (32, 32)))
    ignored = [0]
    found = [item.path for item in scan([str(scratch)], counter=ignored)]
    assert found == [str(scratch / "photos" / "a.png")]
    assert ignored == [0]
