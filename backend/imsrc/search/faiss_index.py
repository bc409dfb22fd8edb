"""An in-process FAISS index per model: one sub-index per category, so a category filter is a choice of
sub-indexes rather than a post-filter (FAISS HNSW with an IDSelector over 3 % of the rows returned 0.8 rows
of 10 in the design probe).

Small categories (below settings.faiss_flat_max_rows) are flat: exact. Mid-sized ones scan 4-bit PQ codes
with SIMD ("fast scan", d/2 sub-quantizers: 1/16 of the float32 bytes) and re-rank the best
RERANK_FACTOR x k candidates exactly against the stored float vectors. Why not HNSW: a graph walk's recall
depends on the data. Inside a category of 10,000 high-dimensional, isotropic points every distance to a
query is nearly tied, and FAISS HNSW (m 32) needed efSearch 800 for recall@10 0.88 on queries from another
category; the scan touches every code, so its recall does not depend on where the query lies
(bench/search: 3 x 10,000 rows in 0.6 ms at recall 0.998, where flat took 2.6 ms).

The PQ scan is linear in the category's rows (1.9 ms for 100,000 real-calibrated 1280-d rows), so categories
of IVF_MIN_ROWS rows or more are split into about 2 sqrt(rows) inverted lists (IVF) and scan the 4-bit codes
(d/2 sub-quantizers) of the nprobe lists nearest the query only, then re-rank exactly the same way. nprobe and
the re-rank depth are not guesses: they are calibrated when the sub-index is built (FaissModelIndex.calibrate)
as the cheapest pair at which held-out queries reach CALIBRATION_RECALL (recall@10 vs exact in this category):
members of the category (their own row left out of the truth) and, when other categories exist, members of
those (the hard case: stage 1 also searches categories the query is not from, whose best rows lie far from
the query). Measured by bench/search/faiss_category_bench.py.

Vectors are unit length and searched by inner product (= cosine). Deletions and category moves leave a
tombstone (filtered out of an over-fetched answer, harmless while they are few); a sub-index with more than
20 % tombstones, or grown to RETRAIN_GROWTH x the rows its codebook was trained on, is rebuilt from its own
stored vectors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import faiss
import numpy as np

from imsrc.search.faiss_locations import Locations
from imsrc.search.repository import Watermark

Hit = tuple[int, float]
COMPACT_FRACTION = 0.2
# PQ codebooks: 16 centroids per sub-quantizer want >= 39 x 16 training points (FAISS warns below that).
PQ_MIN_ROWS = 1000
PQ_TRAIN_MAX_ROWS = 20_000  # a sample this large trains codebooks as well as the whole category
RERANK_FACTOR = 40  # candidates re-ranked exactly per result asked for (recall 0.998 at 20-50 in bench/search)
RETRAIN_GROWTH = 4
# IVF: categories from this size on (constructor argument ivf_min_rows; see faiss_category_bench.py for where the
# IVF scan starts to beat the full PQ scan). Lists ~ 2 sqrt(rows); k-means on up to IVF_TRAIN_PER_LIST x lists
# sampled rows, IVF_TRAIN_ITERATIONS iterations (the lists only decide what is scanned; the re-rank is exact).
# 10,000 rows: ivf 0.33-0.34 ms vs pq 0.59-0.61 ms at recall 0.988-0.996 vs 1.0; 15,000: 0.39-0.40 vs 0.74 ms.
IVF_MIN_ROWS = 10_000
IVF_LISTS_PER_SQRT_ROW = 2  # 4: the same recall at the same nprobe, but a coarse step twice as long
IVF_TRAIN_PER_LIST = 32
IVF_TRAIN_ITERATIONS = 10
# Mean recall@10 each group of held-out queries must reach (members, other categories). 0.98 is what is wanted on
# fresh queries; the cheapest of ~25 measured settings is chosen where its 100-query sample happened to do well,
# so the target has a margin (at 0.98 fresh other-category queries got 0.9735 in faiss_category_bench.py).
CALIBRATION_RECALL = 0.99
CALIBRATION_QUERIES = 100  # per group
CALIBRATION_K = 10
RERANK_CHOICES = (10, 15, 20, 30, 40)  # k_factor values an IVF sub-index's calibration chooses from
# A byte of float vector gathered for the re-rank costs about 2.5x a byte of codes streamed by the fast scan (100,000
# rows, 1280-d: re-rank ~0.17 ms per MB, scan ~0.07 ms per MB, from nprobe x k_factor grids of both).
RERANK_BYTE_COST = 2.5


@contextmanager
def _one_omp_thread() -> Iterator[None]:
    """One query is far too little work to share: a second OpenMP thread only waits for (or spins against)
    whatever else holds the other core. With PostgreSQL busy beside it, a 10,000-row category took 1.7 ms
    with 2 threads and 0.66 ms with 1 (0.37 ms on an idle machine). omp_set_num_threads is per calling
    thread, so index builds elsewhere keep their threads."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _ivf_lists(n: int) -> int:
    return max(1, round(IVF_LISTS_PER_SQRT_ROW * float(np.sqrt(n))))


def _new_index(dimension: int, n: int, flat_max_rows: int, ivf_min_rows: int) -> faiss.Index:
    if n < max(flat_max_rows, PQ_MIN_ROWS) or dimension % 2:
        return faiss.IndexFlatIP(dimension)
    codes: faiss.Index
    if n >= ivf_min_rows:
        # d/2 sub-quantizers, not d/4: the finer codes rank other categories' queries well enough for a shallower
        # re-rank, whose scattered 5 KB reads cost more than the longer streamed scan (100,000 real-calibrated rows,
        # each at its calibrated setting, interleaved: d/2 nprobe 88 / 15 x k 0.87-0.92 ms, d/4 nprobe 80 / 40 x k
        # 1.07-1.11 ms, both recall@10 0.994 on other-category queries).
        lists = _ivf_lists(n)
        codes = faiss.IndexIVFPQFastScan(
            faiss.IndexFlatIP(dimension), dimension, lists, dimension // 2, 4, faiss.METRIC_INNER_PRODUCT
        )
        codes.cp.niter = IVF_TRAIN_ITERATIONS
    else:
        codes = faiss.IndexPQFastScan(dimension, dimension // 2, 4, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(codes)
    index.k_factor = RERANK_FACTOR
    return index


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of a sub-index (where nprobe lives), None for the other kinds."""
    if not isinstance(index, faiss.IndexRefine):
        return None
    base = faiss.downcast_index(index.base_index)
    return base if isinstance(base, faiss.IndexIVF) else None


def _mean_recall(got: list[list[int]], truth: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)]))


def _train(index: faiss.Index, vectors: np.ndarray) -> None:
    if index.is_trained:
        return
    rows = PQ_TRAIN_MAX_ROWS
    ivf = _ivf(index)
    if ivf is not None:
        rows = max(rows, IVF_TRAIN_PER_LIST * ivf.nlist)
    sample = vectors
    if len(vectors) > rows:  # deterministic sample: the same rows train the same codebooks
        sample = vectors[np.random.default_rng(0).choice(len(vectors), rows, replace=False)]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


@dataclass
class SubIndex:
    index: faiss.Index
    ids: np.ndarray  # position -> image id
    removed: set[int] = field(default_factory=set)
    trained_on: int = 0  # rows the PQ codebooks (and IVF lists) were trained on (0 for flat)
    # Read from a saved file with mmap (FaissStore): the pages are the OS's file cache, shared by every worker
    # process that maps the same file, and read-only: FAISS aborts the whole process on an add to such an index.
    mapped: bool = False
    # Handed to a save that writes it outside the index lock (FaissModelIndex.snapshot): the next change works on
    # a copy instead, so the file gets the rows of the snapshot, never half of an add.
    frozen: bool = False
    _selector: object | None = None

    def own(self) -> None:
        """Copy a memory-mapped index, or one a save is writing, into a private one, so it can change."""
        if self.mapped or self.frozen:
            self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
            # An IVF one keeps its calibrated k_factor (saved in the index, like nprobe).
            if isinstance(self.index, faiss.IndexRefine) and _ivf(self.index) is None:
                self.index.k_factor = RERANK_FACTOR
            self.mapped = self.frozen = False

    @property
    def live(self) -> int:
        return len(self.ids) - len(self.removed)

    @property
    def kind(self) -> str:
        if not isinstance(self.index, faiss.IndexRefine):
            return "flat"
        return "ivf" if _ivf(self.index) is not None else "pq"

    @property
    def k_factor(self) -> int:
        """Candidates re-ranked exactly per result asked for (0: flat)."""
        return int(self.index.k_factor) if isinstance(self.index, faiss.IndexRefine) else 0

    @property
    def nprobe(self) -> int:
        """Inverted lists scanned per query (0: not an IVF sub-index). Saved inside the index file."""
        ivf = _ivf(self.index)
        return 0 if ivf is None else int(ivf.nprobe)

    def vectors(self) -> np.ndarray:
        return self.index.reconstruct_n(0, self.index.ntotal) if self.index.ntotal else np.zeros((0, self.index.d))

    def search(self, query: np.ndarray, limit: int) -> list[Hit]:
        if self.live <= 0:
            return []
        want = min(limit, self.live)
        if self.kind != "flat":
            # Fast-scan codes take no IDSelector: ask for enough extra rows that tombstones cannot crowd out
            # live ones, then drop them here. Never fewer than CALIBRATION_K: the re-rank gets k_factor x what is
            # asked, and an IVF sub-index's k_factor was calibrated for 10 (at k = 1 a member's own row fell out
            # of 10 candidates in tests/test_faiss_ivf.py).
            fetch = max(want, CALIBRATION_K) + len(self.removed)
            scores, labels = self.index.search(query.reshape(1, -1), min(fetch, len(self.ids)))
            hits = [
                (int(p), float(s))
                for p, s in zip(labels[0], scores[0], strict=True)
                if p >= 0 and int(p) not in self.removed
            ]
            return [(int(self.ids[p]), s) for p, s in hits[:want]]
        params = None
        if self.removed:
            if self._selector is None:
                batch = faiss.IDSelectorBatch(np.fromiter(self.removed, dtype=np.int64))
                self._selector = (batch, faiss.IDSelectorNot(batch))  # keep both alive for the C++ side
            params = faiss.SearchParameters()
            params.sel = self._selector[1]  # type: ignore[index]
        scores, labels = self.index.search(query.reshape(1, -1), want, params=params)
        return [(int(self.ids[p]), float(s)) for p, s in zip(labels[0], scores[0], strict=True) if p >= 0]


@dataclass(frozen=True)
class SavedSub:
    """One category of a snapshot: what a save writes (the index object no change touches any more)."""

    category_id: int
    index: faiss.Index
    ids: np.ndarray
    kind: str
    trained_on: int
    nprobe: int = 0


@dataclass(frozen=True)
class Snapshot:
    subs: list[SavedSub]
    watermark: Watermark
    count: int
    replayed: int


class FaissModelIndex:
    """All sub-indexes of one model, plus where each image lives. Thread-safe."""

    def __init__(
        self,
        *,
        model_id: int,
        model_name: str,
        dimension: int,
        flat_max_rows: int,
        watermark: Watermark,
        ivf_min_rows: int = IVF_MIN_ROWS,
    ) -> None:
        self.model_id = model_id
        self.model_name = model_name
        self.dimension = dimension
        self.flat_max_rows = flat_max_rows
        self.ivf_min_rows = ivf_min_rows
        self.watermark = watermark  # which committed changes the index already holds
        self.subs: dict[int, SubIndex] = {}  # category id (-1 = none) -> sub-index
        self.where = Locations()  # image id -> (category, position)
        self.lock = threading.RLock()
        # The saved files this index was loaded from (FaissStore: meta.json's inode and mtime), None if unsaved,
        # and how many changed images it has replayed from the change log since.
        self.saved_as: tuple[int, int] | None = None
        self.replayed = 0

    def __len__(self) -> int:
        return len(self.where)

    def category_sizes(self) -> dict[int, int]:
        return {c: s.live for c, s in self.subs.items()}

    def add_category(
        self, category_id: int, image_ids: np.ndarray, vectors: np.ndarray, *, calibrate: bool = True
    ) -> None:
        """Bulk build of one category's sub-index (used by the initial build). calibrate=False leaves an IVF
        sub-index's nprobe to a later calibrate_all() (a build calibrates once every category is in, so each
        has the others' rows as queries)."""
        index = _new_index(self.dimension, len(image_ids), self.flat_max_rows, self.ivf_min_rows)
        if len(image_ids):
            _train(index, vectors)
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        trained_on = len(image_ids) if isinstance(index, faiss.IndexRefine) else 0
        self.subs[category_id] = SubIndex(index, np.asarray(image_ids, dtype=np.int64).copy(), trained_on=trained_on)
        for pos, image_id in enumerate(image_ids.tolist()):
            self.where[image_id] = (category_id, pos)
        if calibrate:
            self.calibrate(category_id)

    def describe(self) -> dict[int, dict[str, int | str]]:
        """Per category: kind, live rows, nprobe and re-rank depth (for benchmarks' results files and logs)."""
        with self.lock:
            return {
                c: {"kind": s.kind, "live": s.live, "nprobe": s.nprobe, "k_factor": s.k_factor}
                for c, s in sorted(self.subs.items())
            }

    def calibrate_all(self) -> dict[int, dict[str, float]]:
        """calibrate() every IVF sub-index; returns what each chose."""
        with self.lock:
            return {c: self.calibrate(c) for c, sub in list(self.subs.items()) if sub.kind == "ivf"}

    def calibrate(self, category_id: int) -> dict[str, float]:
        """Set an IVF sub-index's nprobe and re-rank depth (k_factor): for each k_factor in RERANK_CHOICES the
        smallest nprobe (to within 1/8; up to all lists) at which every group of held-out queries reaches
        CALIBRATION_RECALL mean recall@10 against an exact scan of this category; of those pairs, the one that
        costs the least (RERANK_BYTE_COST x the float vectors re-ranked + the codes of the probed lists, in
        bytes). Groups: up to CALIBRATION_QUERIES of its own rows (each query's
        own row is left out of both answers: a member trivially finds itself) and as many rows of the other
        categories (stage 1 searches up to 3 categories, so a category is also asked about queries that are not
        its own: their best rows lie on the category's edge, spread over more lists, and their code estimates
        are closer together, so they need a deeper re-rank). Deterministic: the same rows give the same choice."""
        sub = self.subs[category_id]
        ivf = _ivf(sub.index)
        k = min(CALIBRATION_K, len(sub.ids) - 1)
        if ivf is None or sub.live == 0 or k <= 0:
            return {}
        assert isinstance(sub.index, faiss.IndexRefine)
        rng = np.random.default_rng(category_id & 0x7FFFFFFF)
        own = rng.choice(len(sub.ids), min(len(sub.ids), CALIBRATION_QUERIES), replace=False)
        groups: list[tuple[np.ndarray, np.ndarray | None]] = [(self._rows(sub, own), own)]
        others = [s for c, s in sorted(self.subs.items()) if c != category_id and len(s.ids)]
        if others:
            per = -(-CALIBRATION_QUERIES // len(others))
            foreign = [self._rows(o, rng.choice(len(o.ids), min(len(o.ids), per), replace=False)) for o in others]
            groups.append((np.concatenate(foreign)[:CALIBRATION_QUERIES], None))
        exact = faiss.downcast_index(sub.index.refine_index)  # the stored float vectors: an exact scan
        truths = [self._top(exact, q, rows, k) for q, rows in groups]
        code_bytes = len(sub.ids) / ivf.nlist * ivf.code_size  # per list probed
        vector_bytes = RERANK_BYTE_COST * CALIBRATION_K * self.dimension * 4  # per unit of k_factor
        tried: list[tuple[float, int, int, list[float]]] = []  # (bytes read, nprobe, k_factor, recalls)

        def measure(nprobe: int) -> list[float]:
            ivf.nprobe = nprobe
            return [
                _mean_recall(self._top(sub.index, q, rows, k), t, k)
                for (q, rows), t in zip(groups, truths, strict=True)
            ]

        with _one_omp_thread():
            for k_factor in RERANK_CHOICES:
                sub.index.k_factor = k_factor
                # Doubling until the target is met, then halving the gap a few times: within 1/8 of the least
                # nprobe that meets it (recall grows with nprobe), in about log2(nprobe) + 3 batches.
                low, high = 0, 1
                recalls = measure(high)
                while min(recalls) < CALIBRATION_RECALL and high < ivf.nlist:
                    low, high = high, min(2 * high, ivf.nlist)
                    recalls = measure(high)
                if min(recalls) >= CALIBRATION_RECALL:
                    while high - low > max(1, high // 8):
                        middle = (low + high) // 2
                        found = measure(middle)
                        if min(found) >= CALIBRATION_RECALL:
                            high, recalls = middle, found
                        else:
                            low = middle
                tried.append((high * code_bytes + k_factor * vector_bytes, high, k_factor, recalls))
        reached = [t for t in tried if min(t[3]) >= CALIBRATION_RECALL]
        # None reaches the target (every list probed): the deepest re-rank, which came closest.
        _, ivf.nprobe, sub.index.k_factor, recalls = (
            min(reached) if reached else max(tried, key=lambda t: (min(t[3]), t[2]))
        )
        out = {
            "nprobe": float(ivf.nprobe),
            "lists": float(ivf.nlist),
            "k_factor": float(sub.index.k_factor),
            "members": recalls[0],
        }
        if len(recalls) > 1:
            out["others"] = recalls[1]
        return out

    @staticmethod
    def _rows(sub: SubIndex, positions: np.ndarray) -> np.ndarray:
        return np.stack([sub.index.reconstruct(int(p)) for p in positions]).astype(np.float32)

    @staticmethod
    def _top(index: faiss.Index, queries: np.ndarray, rows: np.ndarray | None, k: int) -> list[list[int]]:
        """Each query's top k positions, its own row (members) left out."""
        _, labels = index.search(np.ascontiguousarray(queries), k + 1)
        out = []
        for i, found in enumerate(labels.tolist()):
            mine = -1 if rows is None else int(rows[i])
            out.append([p for p in found if p >= 0 and p != mine][:k])
        return out

    def apply(self, changed: list[int], image_ids: np.ndarray, category_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Make the index match the database for `changed` images, given their current rows (absent = gone).

        Idempotent: applying the same change twice leaves the same state, so re-reading the change log from
        a conservative watermark is safe.
        """
        with self.lock:
            for image_id in changed:
                self._remove(image_id)
            by_category: dict[int, list[int]] = {}
            for row, category_id in enumerate(category_ids.tolist()):
                by_category.setdefault(category_id, []).append(row)
            for category_id, rows in by_category.items():
                self._append(category_id, image_ids[rows], vectors[rows])
            for category_id in list(self.subs):
                self._maybe_compact(category_id)

    def _remove(self, image_id: int) -> None:
        found = self.where.pop(image_id)
        if found is not None:
            sub = self.subs[found[0]]
            sub.removed.add(found[1])
            sub._selector = None

    def _append(self, category_id: int, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        sub = self.subs.get(category_id)
        if sub is None:
            self.add_category(category_id, image_ids, vectors)
            return
        start = len(sub.ids)
        sub.own()  # only the categories that changed since the save stop sharing their pages
        sub.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        sub.ids = np.concatenate([sub.ids, image_ids.astype(np.int64)])
        for offset, image_id in enumerate(image_ids.tolist()):
            self.where[image_id] = (category_id, start + offset)
        if (
            (sub.kind == "flat" and sub.live >= max(self.flat_max_rows, PQ_MIN_ROWS))
            or (sub.kind == "pq" and sub.live >= self.ivf_min_rows)
            or (sub.kind != "flat" and sub.live > RETRAIN_GROWTH * sub.trained_on)
        ):
            # A flat or PQ index grown into the next kind, or codebooks (and lists) trained on too few rows.
            self._rebuild(category_id)

    def _maybe_compact(self, category_id: int) -> None:
        sub = self.subs.get(category_id)
        if sub is not None and sub.removed and len(sub.removed) > COMPACT_FRACTION * len(sub.ids):
            self._rebuild(category_id)

    def _rebuild(self, category_id: int) -> None:
        sub = self.subs[category_id]
        keep = np.array([p for p in range(len(sub.ids)) if p not in sub.removed], dtype=np.int64)
        vectors = sub.vectors()[keep] if len(keep) else np.zeros((0, self.dimension), np.float32)
        for image_id in sub.ids[keep].tolist():
            self.where.pop(image_id)
        del self.subs[category_id]
        if len(keep):
            self.add_category(category_id, sub.ids[keep], vectors)

    def snapshot(self) -> Snapshot:
        """The index as of now, for a save that writes it without holding the lock (searches and catch-ups go
        on meanwhile). Sub-indexes with tombstones are compacted first (tombstones are not saved); every sub-index
        is then frozen: the change log's next append to it copies it first (SubIndex.own), and removals and
        rebuilds replace the SubIndex rather than touching the frozen index. ids arrays are replaced, never
        changed in place, so holding references is enough."""
        with self.lock:
            for category_id, sub in list(self.subs.items()):
                if sub.removed:
                    self._rebuild(category_id)
            subs = []
            for category_id, sub in self.subs.items():
                sub.frozen = True
                subs.append(SavedSub(category_id, sub.index, sub.ids, sub.kind, sub.trained_on, sub.nprobe))
            return Snapshot(subs, self.watermark, len(self), self.replayed)

    def search(self, query: np.ndarray, category_ids: list[int] | None, limit: int) -> list[Hit]:
        q = np.ascontiguousarray(query, dtype=np.float32)
        with self.lock, _one_omp_thread():
            targets = list(self.subs) if category_ids is None else [c for c in category_ids if c in self.subs]
            hits: list[Hit] = []
            for c in targets:
                hits.extend(self.subs[c].search(q, limit))
            if len(hits) < min(limit, sum(self.subs[c].live for c in targets)):
                hits = self._exact(q, targets)  # never expected; k rows are promised, so answer exactly
        hits.sort(key=lambda h: (-h[1], h[0]))
        return hits[:limit]

    def _exact(self, query: np.ndarray, targets: list[int]) -> list[Hit]:
        hits: list[Hit] = []
        for c in targets:
            sub = self.subs[c]
            live = np.array([p for p in range(len(sub.ids)) if p not in sub.removed], dtype=np.int64)
            if len(live):
                scores = sub.vectors()[live] @ query
                hits.extend(zip(sub.ids[live].tolist(), scores.tolist(), strict=True))
        return hits
