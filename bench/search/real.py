"""Real embeddings for the search benchmark: Fashion-MNIST (Debian's dataset-fashion-mnist) embedded once with
EfficientNet-Lite0 (the registry-shipped ImageNet weights), cached under bench/search/data/ (gitignored).

Images are taken test split first (10k), then train (60k), so `--real 10000` is the test split alone and
`--real 70000` the whole dataset. Each image goes through the catalog's own preparation (imaging.model_image:
grey -> RGB) and the embedder's preprocess, as an uploaded image would.
"""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imsrc.config import Settings

DATASET = Path("/usr/share/datasets/fashion-mnist")
SPLITS = (("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
          ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"))
MODEL = "efficientnet-lite0"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
DATA = Path(__file__).resolve().parent / "data"


def check_available() -> None:
    """Stops with one line before any work when the Debian dataset is missing."""
    missing = [name for pair in SPLITS for name in pair if not (DATASET / name).is_file()]
    if missing:
        raise SystemExit(f"real-data mode needs Debian's dataset-fashion-mnist ({DATASET}/{missing[0]} is "
                         "missing): apt install dataset-fashion-mnist")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    _, _dtype, ndim = struct.unpack(">HBB", raw[:4])
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def images(n: int) -> tuple[np.ndarray, np.ndarray]:
    check_available()
    imgs = np.concatenate([_idx(DATASET / a) for a, _ in SPLITS])
    labels = np.concatenate([_idx(DATASET / b) for _, b in SPLITS]).astype(np.int64)
    if n > len(imgs):
        raise SystemExit(f"Fashion-MNIST has {len(imgs)} images; asked for {n}")
    return imgs[:n], labels[:n]


def embed(n: int, inference: str = "auto", batch: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(unit vectors (n, 1280) float32, labels (n,), facts about the embedding run). Cached per n."""
    DATA.mkdir(parents=True, exist_ok=True)
    cache = DATA / f"fashion-mnist-{MODEL}-{n}.npz"
    if cache.exists():
        saved = np.load(cache)
        return saved["vectors"], saved["labels"], {"cached": 1.0, "embed_s": float(saved["embed_s"])}
    for bigger in sorted(DATA.glob(f"fashion-mnist-{MODEL}-*.npz"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        if int(bigger.stem.rsplit("-", 1)[1]) > n:  # same order of images: the first n of a larger run
            saved = np.load(bigger)
            share = n / len(saved["labels"])
            return saved["vectors"][:n], saved["labels"][:n], {"cached": 1.0,
                                                               "embed_s": float(saved["embed_s"]) * share}
    from imsrc.embeddings.loading import load_embedder
    from imsrc.imaging import model_image

    raw, labels = images(n)
    embedder = load_embedder(MODEL, Settings(inference=inference, _env_file=None))  # type: ignore[call-arg]
    out = np.empty((n, 1280), dtype=np.float32)
    started = time.perf_counter()
    import torch

    for start in range(0, n, batch):
        tensors = [embedder.preprocess(model_image(Image.fromarray(a)))  # type: ignore[attr-defined]
                   for a in raw[start:start + batch]]
        out[start:start + len(tensors)] = embedder.encode_images(torch.stack(tensors))
        if start // batch % 20 == 0:
            print(f"embedded {start + len(tensors)}/{n} ({time.perf_counter() - started:.0f} s)", flush=True)
    took = time.perf_counter() - started
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    np.savez(cache, vectors=out, labels=labels, embed_s=took)
    return out, labels, {"cached": 0.0, "embed_s": took}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="embed Fashion-MNIST once into bench/search/data/")
    parser.add_argument("n", type=int, nargs="?", default=10_000)
    parser.add_argument("--inference", default="auto")
    a = parser.parse_args()
    v, lab, facts = embed(a.n, a.inference)
    print(v.shape, facts)
