"""Real embeddings for the search benchmark: Fashion-MNIST (Debian's dataset-fashion-mnist) embedded once with
EfficientNet-Lite0 (the registry-shipped ImageNet weights), cached under bench/search/data/ (gitignored).

Images are taken test split first (10k), then train (60k), so `--real 10000` is the test split alone and
`--real 70000` the whole dataset. Each image goes through the catalog's own preparation (imaging.model_image:
grey -> RGB) and the embedder's preprocess, as an uploaded image would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imsrc.config import Settings
from imsrc.ingest.demo import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx

DATASET = DEBIAN_FASHION_MNIST
SPLITS = (
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
)
MODEL = "efficientnet-lite0"
CLASSES = FASHION_CLASSES
DATA = Path(__file__).resolve().parent / "data"


def calibrated_facts(rows: int, base_rows: int) -> dict[str, Any]:
    """What a results file says about a catalog made by load.real_calibrated from `base_rows` real embeddings
    (bench/search/service_bench.py and bench/citus/run.py)."""
    from bench.search.load import REAL_CALIBRATED_NOISE

    return {
        "kind": "real-calibrated",
        "rows": rows,
        "base_rows": base_rows,
        "noise": REAL_CALIBRATED_NOISE,
        "model": MODEL,
        "dataset": "Fashion-MNIST embeddings (EfficientNet-Lite0) + Gaussian noise of each label's spread",
    }


def check_available() -> None:
    """Stops with one line before any work when the Debian dataset is missing."""
    missing = [name for pair in SPLITS for name in pair if not (DATASET / name).is_file()]
    if missing:
        raise SystemExit(
            f"real-data mode needs Debian's dataset-fashion-mnist ({DATASET}/{missing[0]} is "
            "missing): apt install dataset-fashion-mnist"
        )


def images(n: int) -> tuple[np.ndarray, np.ndarray]:
    check_available()
    imgs = np.concatenate([read_idx(DATASET / a) for a, _ in SPLITS])
    labels = np.concatenate([read_idx(DATASET / b) for _, b in SPLITS]).astype(np.int64)
    if n > len(imgs):
        raise SystemExit(f"Fashion-MNIST has {len(imgs)} images; asked for {n}")
    return imgs[:n], labels[:n]


CHECKPOINT = 10_000  # a long run saves every this many images as the cache of that size, and resumes from it


def _cached(n: int) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The first n vectors from the smallest cache holding at least n (same order of images)."""
    for path in sorted(DATA.glob(f"fashion-mnist-{MODEL}-*.npz"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        size = int(path.stem.rsplit("-", 1)[1])
        if size >= n:
            saved = np.load(path)
            return saved["vectors"][:n], saved["labels"][:n], float(saved["embed_s"]) * n / size
    return None


def _save(vectors: np.ndarray, labels: np.ndarray, embed_s: float) -> None:
    n = len(labels)
    tmp = DATA / f"partial-{MODEL}-{n}.npz"
    np.savez(tmp, vectors=vectors, labels=labels, embed_s=embed_s)
    tmp.replace(DATA / f"fashion-mnist-{MODEL}-{n}.npz")
    for smaller in DATA.glob(f"fashion-mnist-{MODEL}-*.npz"):  # the new file serves every smaller size
        if int(smaller.stem.rsplit("-", 1)[1]) < n:
            smaller.unlink()


def embed(n: int, inference: str = "auto", batch: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(unit vectors (n, 1280) float32, labels (n,), facts about the embedding run). Cached; a run that stops
    part way resumes from its last checkpoint."""
    DATA.mkdir(parents=True, exist_ok=True)
    hit = _cached(n)
    if hit is not None:
        return hit[0], hit[1], {"cached": 1.0, "embed_s": hit[2]}
    from imsrc.embeddings.loading import load_embedder
    from imsrc.imaging import model_image

    raw, labels = images(n)
    done = max((int(p.stem.rsplit("-", 1)[1]) for p in DATA.glob(f"fashion-mnist-{MODEL}-*.npz")), default=0)
    out = np.empty((n, 1280), dtype=np.float32)
    earlier = 0.0
    if done:
        out[:done], _, earlier = _cached(done)  # type: ignore[misc]
    embedder = load_embedder(MODEL, Settings(inference=inference, _env_file=None))  # type: ignore[call-arg]
    started = time.perf_counter()
    start = done
    while start < n:
        end = min(start + batch, n, (start // CHECKPOINT + 1) * CHECKPOINT)
        # np.stack: the ONNX engine's preprocessing gives arrays, torch's gives tensors; both engines take an array.
        batch_arrays = np.stack(
            [np.asarray(embedder.preprocess(model_image(Image.fromarray(a)))) for a in raw[start:end]]  # type: ignore[attr-defined]
        )
        got = np.asarray(embedder.encode_images(batch_arrays), dtype=np.float32)
        out[start:end] = got / np.linalg.norm(got, axis=1, keepdims=True)
        if end % CHECKPOINT == 0 and end < n:
            _save(out[:end], labels[:end], earlier + time.perf_counter() - started)
        if (start - done) // batch % 20 == 0:
            print(f"embedded {end}/{n} ({time.perf_counter() - started:.0f} s)", flush=True)
        start = end
    took = earlier + time.perf_counter() - started
    _save(out, labels, took)
    return out, labels, {"cached": 0.0, "embed_s": took}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="embed Fashion-MNIST once into bench/search/data/")
    parser.add_argument("n", type=int, nargs="?", default=10_000)
    parser.add_argument("--inference", default="auto")
    a = parser.parse_args()
    v, lab, facts = embed(a.n, a.inference)
    print(v.shape, facts)
