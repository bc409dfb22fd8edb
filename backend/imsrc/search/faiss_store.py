"""FaissStore: builds, saves, loads and keeps current one FaissModelIndex per model.

Consistency: the build remembers the snapshot it started from (xmax and the transactions then in progress).
Before each search the store reads the embedding_changes rows that snapshot could not see (triggers write
one per insert, delete or category move, whoever makes it), re-reads those images' current rows, applies
them and moves the watermark. So an image added or deleted after a build is seen by the next query.

Sharing: saved once and memory-mapped by every process that uses them (see _load_or_build).

Persistence: under data_dir/faiss/model-<id>/, one .faiss file and one ids .npy per category, plus meta.json
with the model, dimension, catalog id, watermark and each file's size and SHA-256. A load that fails any
check (other catalog, other model, truncated or altered file, count mismatch) is discarded and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy.orm import Session

from imsrc.catalog.models import EmbeddingModel
from imsrc.db.citus import distributed
from imsrc.search.errors import FAISS_ON_CITUS, BackendUnavailableError
from imsrc.search.faiss_index import IVF_MIN_ROWS, RERANK_FACTOR, FaissModelIndex, Snapshot, SubIndex
from imsrc.search.repository import ChangeLogRepository, SearchStateRepository, VectorRepository, Watermark

log = logging.getLogger(__name__)
# 2: PQ fast-scan + re-rank sub-indexes replaced HNSW ones; 3: large categories IVF + PQ fast scan with a calibrated
# nprobe (older saves are rebuilt)
FORMAT_VERSION = 3
CATALOG_KEY = "catalog"
# Saved sub-indexes are memory-mapped (FAISS >= 1.11 maps flat codes in place), so API workers share them.
MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
NO_CATEGORY = -1


def catalog_identity(session: Session) -> str:
    """A random id stored in the catalog itself, so an index saved for another database is never trusted."""
    state = SearchStateRepository(session)
    value = state.get(CATALOG_KEY).get("id")
    if not value:
        # Not put(): API workers warming up at once each made an id and the last commit won, so every worker
        # discarded the others' saved index as "another catalog's" and rebuilt it (seen in bench/load runs).
        value = state.put_if_absent(CATALOG_KEY, {"id": uuid.uuid4().hex}).get("id")
    return str(value)


def write_sub(index: faiss.Index, path: Path) -> None:
    """One sub-index to its file (a function of its own so a test can hold a save half-way)."""
    faiss.write_index(index, str(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FaissStore:
    """Created once per process (app.state / CLI context) and injected into the search service."""

    def __init__(
        self, data_dir: Path | None, *, flat_max_rows: int, resave_changes: int = 0, ivf_min_rows: int = IVF_MIN_ROWS
    ) -> None:
        self.root = None if data_dir is None else Path(data_dir) / "faiss"
        self.flat_max_rows = flat_max_rows
        self.ivf_min_rows = ivf_min_rows
        self.resave_changes = resave_changes  # 0: the saved index is never refreshed
        self._lock = threading.Lock()
        # The file lock is per process (fcntl), so threads of one process that read or write the saved files take
        # this one as well.
        self._files = threading.Lock()
        self._indexes: dict[int, FaissModelIndex] = {}
        self.saving: threading.Thread | None = None  # the latest re-save's thread (see _resave)
        self.last_build_s: float | None = None

    def get(self, session: Session, model: EmbeddingModel) -> FaissModelIndex:
        """The model's index, current as of this session's snapshot."""
        if distributed(session):
            raise BackendUnavailableError(FAISS_ON_CITUS)
        with self._lock:
            index = self._indexes.get(model.id)
            if index is not None and self._saved_since(index):
                index = None  # another process saved a newer index: map its files, replay less
            if index is None:
                index = self._load_or_build(session, model)
                self._indexes[model.id] = index
        self.catch_up(session, index)
        if self.resave_changes and index.replayed >= self.resave_changes and index.watermark.own_xid is None:
            self._resave(session, index)
        return index

    def _meta_stamp(self, model_id: int) -> tuple[int, int] | None:
        try:
            st = (self._dir(model_id) / "meta.json").stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def _saved_since(self, index: FaissModelIndex) -> bool:
        """Whether the saved files are newer than the ones this index was loaded from (one stat per query)."""
        if self.root is None or index.saved_as is None:
            return False
        stamp = self._meta_stamp(index.model_id)
        return stamp is not None and stamp != index.saved_as

    def _resave(self, session: Session, index: FaissModelIndex) -> None:
        """Refresh the saved index once this process has replayed resave_changes changed images since it was
        loaded. Without it every process replays the whole change log since the first save at each start, and
        each category changed since then stays a private copy in every worker. One process saves (the file
        lock, not waited for: whoever holds it is saving or loading and the others go on answering); the others
        notice the new meta.json on their next query and map the new files. Only from a session that has written
        nothing: its own uncommitted changes must not reach the files.

        The files are written in a thread of their own, from a snapshot (FaissModelIndex.snapshot), without the
        index lock: at 1M vectors writing and hashing 2 GB takes seconds, during which this process's searches
        (the one that triggered the save included) and catch-ups go on. The thread is not a daemon: a process that
        exits (a CLI command, a worker told to stop) finishes the save first, never leaving half of one."""
        import fasteners

        assert self.root is not None
        if not self._files.acquire(blocking=False):
            return  # a save (or a load) is in progress in this process
        lock = fasteners.InterProcessLock(str(self.root / f"model-{int(index.model_id)}.lock"))
        if not lock.acquire(blocking=False):
            self._files.release()
            return
        try:
            # Saved by another process meanwhile: this one maps those files on its next query.
            due = not self._saved_since(index)
            if due:
                catalog = catalog_identity(session)
                snapshot = index.snapshot()
        except BaseException:
            due = False
            raise
        finally:
            if not due:
                lock.release()
                self._files.release()
        if not due:
            return

        def write() -> None:
            started = time.perf_counter()
            try:
                self._write(index, snapshot, catalog)
                log.info(
                    "re-saved FAISS index for %s after %d replayed changes, in %.1f s",
                    index.model_name,
                    snapshot.replayed,
                    time.perf_counter() - started,
                )
                with index.lock:  # the changes replayed while it was written still count
                    index.replayed -= snapshot.replayed
                # Stamped as unseen: this process, too, maps the new files on its next query (its changed
                # categories were private copies until now).
                index.saved_as = (-1, -1)
            except Exception:  # logged: the old files stay, and a later query tries again
                log.exception("re-saving the FAISS index for %s failed", index.model_name)
            finally:
                lock.release()
                self._files.release()

        self.saving = threading.Thread(target=write, name=f"imsrc-faiss-save-{index.model_id}")
        self.saving.start()

    def _load_or_build(self, session: Session, model: EmbeddingModel) -> FaissModelIndex:
        """Saved once, mapped by all: the first process (of the API workers sharing data_dir) to need the index
        builds and saves it while holding a file lock, the others wait and then map the saved files, and so does
        the builder, dropping its private copy. N workers then hold one copy of the vectors in the OS's page cache
        instead of N in their own memory; each still catches up from the change log on its own."""
        if self.root is None:
            return self.build(session, model, save=False)
        import fasteners

        self.root.mkdir(parents=True, exist_ok=True)
        with self._files, fasteners.InterProcessLock(str(self.root / f"model-{int(model.id)}.lock")):
            loaded = self._load(session, model)
            if loaded is not None:
                return loaded
            built = self.build(session, model)
            return self._load(session, model) or built

    def build(self, session: Session, model: EmbeddingModel, *, save: bool = True) -> FaissModelIndex:
        started = time.perf_counter()
        changes = ChangeLogRepository(session)
        mark = changes.snapshot()  # taken before reading: nothing committed later is missed
        watermark = Watermark(mark.xmax, mark.xip, mark.own_xid, changes.own_max_seq(model.id, mark.own_xid))
        vectors = VectorRepository(session)
        index = FaissModelIndex(
            model_id=model.id,
            model_name=model.name,
            dimension=model.dimension,
            flat_max_rows=self.flat_max_rows,
            watermark=watermark,
            ivf_min_rows=self.ivf_min_rows,
        )
        for category_id in sorted(vectors.category_counts(model.id), key=lambda c: -1 if c is None else c):
            batch = vectors.fetch(
                model.id,
                model.dimension,
                category_ids=None if category_id is None else [category_id],
                uncategorised=category_id is None,
            )
            index.add_category(
                NO_CATEGORY if category_id is None else category_id, batch.image_ids, batch.vectors, calibrate=False
            )
        index.calibrate_all()  # with every category in: each IVF one is also calibrated on the others' rows
        self.last_build_s = time.perf_counter() - started
        log.info("built FAISS index for %s: %d vectors in %.1f s", model.name, len(index), self.last_build_s)
        if save and self.root is not None:
            self.save(session, index)
        return index

    def catch_up(self, session: Session, index: FaissModelIndex) -> int:
        changes = ChangeLogRepository(session)
        with index.lock:
            mark, rows = changes.snapshot_and_since(index.model_id, index.watermark)
            changed = sorted({image_id for _, _, image_id in rows})
            if changed:
                batch = VectorRepository(session).fetch(index.model_id, index.dimension, image_ids=changed)
                cats = np.where(batch.category_ids < 0, NO_CATEGORY, batch.category_ids)
                index.apply(changed, batch.image_ids, cats, batch.vectors)
            own_seq = max([seq for seq, xid, _ in rows if xid == mark.own_xid], default=0)
            if mark.own_xid is not None and mark.own_xid == index.watermark.own_xid:
                own_seq = max(own_seq, index.watermark.own_seq)
            index.watermark = Watermark(mark.xmax, mark.xip, mark.own_xid, own_seq)
            index.replayed += len(changed)
        return len(changed)

    def invalidate(self, model_id: int | None = None) -> None:
        with self._lock:
            if model_id is None:
                self._indexes.clear()
            else:
                self._indexes.pop(model_id, None)

    # ------------------------------------------------------------------ persistence
    def _dir(self, model_id: int) -> Path:
        assert self.root is not None
        return self.root / f"model-{int(model_id)}"

    def save(self, session: Session, index: FaissModelIndex) -> Path:
        return self._write(index, index.snapshot(), catalog_identity(session))

    def wait_for_save(self, timeout: float | None = None) -> bool:
        """Wait for a re-save in progress in this process (if any); False if it is still running."""
        saving = self.saving
        if saving is not None:
            saving.join(timeout)
            return not saving.is_alive()
        return True

    def _write(self, index: FaissModelIndex, snapshot: Snapshot, catalog: str) -> Path:
        """Write a snapshot into a new directory and swap it in (no index lock needed: see snapshot())."""
        target = self._dir(index.model_id)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files: list[dict[str, Any]] = []
        for sub in snapshot.subs:
            write_sub(sub.index, tmp / f"c{sub.category_id}.faiss")
            np.save(tmp / f"c{sub.category_id}.ids.npy", sub.ids)
            files.append(
                {
                    "category": sub.category_id,
                    "kind": sub.kind,
                    "count": len(sub.ids),
                    "trained_on": sub.trained_on,
                    "nprobe": sub.nprobe,  # informational: the index file holds it (and the k_factor)
                }
            )
        meta = {
            "format": FORMAT_VERSION,
            "catalog": catalog,
            "model_id": index.model_id,
            "model": index.model_name,
            "dimension": index.dimension,
            "watermark": snapshot.watermark.as_dict(),
            "flat_max_rows": index.flat_max_rows,
            "ivf_min_rows": index.ivf_min_rows,
            "count": snapshot.count,
            "subs": files,
        }
        for entry in files:
            for suffix in (".faiss", ".ids.npy"):
                path = tmp / f"c{entry['category']}{suffix}"
                entry[suffix] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # readers see the old directory or the complete new one
        return target

    def _load(self, session: Session, model: EmbeddingModel) -> FaissModelIndex | None:
        if self.root is None:
            return None
        folder = self._dir(model.id)
        if not (folder / "meta.json").is_file():
            return None
        try:
            return self._read(session, model, folder)
        except Exception as exc:  # any defect means: do not trust it, rebuild from the database
            log.warning("discarding saved FAISS index in %s: %s", folder, exc)
            return None

    def _read(self, session: Session, model: EmbeddingModel, folder: Path) -> FaissModelIndex:
        stamp = self._meta_stamp(model.id)  # under the file lock: no save replaces the files meanwhile
        meta = json.loads((folder / "meta.json").read_text())
        expected = {
            "format": FORMAT_VERSION,
            "catalog": catalog_identity(session),
            "model_id": model.id,
            "model": model.name,
            "dimension": model.dimension,
            "flat_max_rows": self.flat_max_rows,
            "ivf_min_rows": self.ivf_min_rows,
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(f"{key} is {meta.get(key)!r}, expected {value!r}")
        watermark = Watermark.from_dict(meta["watermark"])
        if watermark.xmax > ChangeLogRepository(session).snapshot().xmax:
            raise ValueError("watermark is ahead of the database (restored from an older backup?)")
        index = FaissModelIndex(
            model_id=model.id,
            model_name=model.name,
            dimension=model.dimension,
            flat_max_rows=self.flat_max_rows,
            watermark=watermark,
            ivf_min_rows=self.ivf_min_rows,
        )
        for entry in meta["subs"]:
            paths = {s: folder / f"c{entry['category']}{s}" for s in (".faiss", ".ids.npy")}
            for suffix, path in paths.items():
                if path.stat().st_size != entry[suffix]["bytes"] or _sha256(path) != entry[suffix]["sha256"]:
                    raise ValueError(f"{path.name} does not match its checksum")
            sub_index = faiss.read_index(str(paths[".faiss"]), MMAP_FLAGS)
            # Mapped like the index: the ids are never changed in place (an append makes a new array).
            ids = np.load(paths[".ids.npy"], mmap_mode="r")
            if sub_index.d != model.dimension or sub_index.ntotal != len(ids) or len(ids) != entry["count"]:
                raise ValueError(f"sub-index for category {entry['category']} has inconsistent sizes")
            if isinstance(sub_index, faiss.IndexRefine) and entry["kind"] == "pq":
                sub_index.k_factor = RERANK_FACTOR  # an IVF one keeps its calibrated one (saved in its file)
            category = int(entry["category"])
            index.subs[category] = SubIndex(
                sub_index,
                ids if ids.dtype == np.int64 else ids.astype(np.int64),
                trained_on=int(entry["trained_on"]),
                mapped=MMAP_FLAGS != 0,
            )
        index.where.load([(category, sub.ids) for category, sub in index.subs.items()])
        if len(index) != meta["count"]:
            raise ValueError("image count does not match")
        index.saved_as = stamp
        return index
