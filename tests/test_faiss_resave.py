"""The saved FAISS index is refreshed (issue 16): once a process has replayed IMSRC_FAISS_RESAVE_CHANGES changed
images from the change log since the save, it saves its index again, and another process using the same data
directory maps the new files on its next query instead of replaying the log (and keeping private copies of the
changed categories). Two real processes, a real database, committed uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from imsrc.catalog.repository import ModelRepository
from imsrc.config import Settings
from imsrc.embeddings.registry import get_embedder
from imsrc.ingest.service import ingest_bytes
from imsrc.search import faiss_store
from imsrc.search.faiss_store import FaissStore
from tests.fixtures.database import database_for
from tests.helpers import ROOT, make_image
from tests.ingest_support import TEST_MODEL

# The other process: loads the index, reports, then on each line from stdin queries again and reports.
OTHER = """
import json, os, sys
from pathlib import Path
from imsrc.catalog.repository import ModelRepository
from imsrc.config import Settings
from imsrc.db.engine import make_engine
from imsrc.db.session import Database
from imsrc.search.faiss_store import FaissStore

url, data_dir = sys.argv[1], Path(sys.argv[2])
settings = Settings(database_url=url, data_dir=data_dir, _env_file=None)
db = Database(url=url, engine=make_engine(url), settings=settings, revision="head", pgvector_version="")
store = FaissStore(data_dir, flat_max_rows=settings.faiss_flat_max_rows, resave_changes=1000)
line = "load"
while line:
    with db.session() as session:
        index = store.get(session, ModelRepository(session).active())
        print(json.dumps({"count": len(index), "replayed": index.replayed, "saved_as": index.saved_as,
                          "mapped": all(s.mapped for s in index.subs.values()), "id": id(index)}), flush=True)
    line = sys.stdin.readline()
"""


def _upload(db, settings: Settings, seeds: range) -> None:  # type: ignore[no-untyped-def]
    with db.session() as session:
        ingest_bytes(
            session,
            get_embedder(TEST_MODEL),
            [(f"{i}.png", make_image(i)) for i in seeds],
            settings=settings,
            category="things",
        )


def _saved_catalog(url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """6 committed uploads, and a store that re-saves after 3 replayed changes, whose index was built and saved once
    (then mapped): (db, settings, store, model, that index, data_dir)."""
    data_dir = tmp_path_factory.mktemp("resave")
    settings = Settings(database_url=url, data_dir=data_dir, model=TEST_MODEL, _env_file=None)  # type: ignore[call-arg]
    db = database_for(settings)
    _upload(db, settings, range(6))
    store = FaissStore(data_dir, flat_max_rows=settings.faiss_flat_max_rows, resave_changes=3)
    with db.session() as session:
        model = ModelRepository(session).active()
        assert model is not None
        first = store.get(session, model)
    return db, settings, store, model, first, data_dir


def test_resaved_index_is_mapped_by_the_other_process(
    create_database, tmp_path_factory: pytest.TempPathFactory
) -> None:  # type: ignore[no-untyped-def]
    db, settings, store, model, first, data_dir = _saved_catalog(create_database("imsrc_resave"), tmp_path_factory)
    meta_path = data_dir / "faiss" / f"model-{int(model.id)}" / "meta.json"
    saved = json.loads(meta_path.read_text())
    assert saved["count"] == 6 and first.saved_as is not None

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "backend"), str(ROOT)])}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER, settings.database_url, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        before = json.loads(other.stdout.readline())
        assert before == {**before, "count": 6, "replayed": 0, "mapped": True, "saved_as": list(first.saved_as)}

        _upload(db, settings, range(100, 104))  # 4 changed images, committed: over this process's threshold of 3
        with db.session() as session:
            caught_up = store.get(session, model)
        assert caught_up is first and len(first) == 10
        assert store.wait_for_save(60)  # written in a thread of its own
        resaved = json.loads(meta_path.read_text())
        assert resaved["count"] == 10 and resaved["watermark"] != saved["watermark"]
        assert first.replayed == 0
        # The category that changed was copied out of the mapped file to take the new rows ...
        assert not all(s.mapped for s in first.subs.values())

        other.stdin.write("query\n")
        other.stdin.flush()
        after = json.loads(other.stdout.readline())
        # ... the other process maps the new files instead of replaying the 4 changes into a private copy.
        assert after["id"] != before["id"] and after["saved_as"] != before["saved_as"]
        assert after == {**after, "count": 10, "replayed": 0, "mapped": True}
    finally:
        if other.stdin is not None:
            other.stdin.close()
        other.wait(60)

    # And the saving process maps them too on its next query.
    with db.session() as session:
        again = store.get(session, model)
    assert again is not first and len(again) == 10 and again.replayed == 0
    assert all(s.mapped for s in again.subs.values())
    db.dispose()


def test_searches_answer_while_the_index_is_being_saved(
    create_database, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The re-save writes a snapshot outside the index lock: while it is held half-way (after its first file), a
    query in the same process catches up with new uploads and searches; the files get the snapshot's rows only,
    and load cleanly. (Before, the save held the index lock while writing: that query waited for the whole save,
    seconds at 1M vectors.)"""
    db, settings, store, model, first, data_dir = _saved_catalog(create_database("imsrc_resave_busy"), tmp_path_factory)
    meta_path = data_dir / "faiss" / f"model-{int(model.id)}" / "meta.json"

    halfway, release = threading.Event(), threading.Event()
    write_sub = faiss_store.write_sub

    def held(index, path):  # type: ignore[no-untyped-def]
        write_sub(index, path)
        halfway.set()
        release.wait(60)

    monkeypatch.setattr(faiss_store, "write_sub", held)
    probe = np.ones(model.dimension, dtype=np.float32) / np.sqrt(model.dimension)

    def query(out: list[tuple[int, list[tuple[int, float]]]]) -> None:
        with db.session() as session:
            index = store.get(session, model)
            out.append((len(index), index.search(probe, None, 5)))

    try:
        _upload(db, settings, range(100, 104))  # 4 changes > 3: the next query starts a save
        threading.Thread(target=query, args=([],), daemon=True).start()
        assert halfway.wait(60), "the save did not start"
        _upload(db, settings, range(200, 202))  # 2 more, into the category being written
        answered: list[tuple[int, list[tuple[int, float]]]] = []
        searcher = threading.Thread(target=query, args=(answered,), daemon=True)
        searcher.start()
        searcher.join(20)
        assert answered, "a search waited for the save"
        assert not release.is_set() and store.saving is not None and store.saving.is_alive()
        count, hits = answered[0]
        assert count == 12 and len(hits) == 5
    finally:
        release.set()
    assert store.wait_for_save(60)
    saved = json.loads(meta_path.read_text())
    assert saved["count"] == 10  # the snapshot's rows, not the 2 appended while it was written
    with db.session() as session:  # the new files pass every check and the 2 later changes are replayed
        again = store.get(session, model)
    assert again is not first and len(again) == 12 and again.replayed == 2
    db.dispose()


def test_workers_starting_together_agree_on_the_catalog_identity(create_database, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Two transactions asking for the catalog's id at once (two API workers' first queries): the second waits for
    the first's commit and gets its id. Before, each made its own and the later commit replaced the other, so a
    worker discarded the index its sibling had just saved as another catalog's and rebuilt it."""
    db = database_for(settings.model_copy(update={"database_url": create_database("imsrc_identity")}))
    got: list[str] = []
    with db.session() as first:
        mine = faiss_store.catalog_identity(first)
        other = threading.Thread(target=lambda: got.append(_identity(db)), daemon=True)
        other.start()
        other.join(1.0)
        assert other.is_alive()  # waiting for the first transaction, not making an id of its own
    other.join(30)
    assert got == [mine]
    assert _identity(db) == mine
    db.dispose()


def _identity(db) -> str:  # type: ignore[no-untyped-def]
    with db.session() as session:
        return faiss_store.catalog_identity(session)
