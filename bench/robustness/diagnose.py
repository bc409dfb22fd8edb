"""Why does a re-ranking comparator miss? Per query of the chosen edits: where the source ranked by the embedding
(exact cosine), whether it is among the rerank_top candidates, its comparator score and the winner's.

    nice -n 10 python bench/robustness/diagnose.py [--edits rotated_12_brighter_30,mirrored] [--comparators orb,sift]

No database: the catalog of bench/robustness/images.py is embedded in-process (EfficientNet-Lite0, as the
benchmark does), the thumbnails are made by the ingest code (imsrc.ingest.decode.make_thumbnail, 256 px WEBP) and
the queries decoded by the search code (decode_query), so the comparators see the pixels the service gives them.
The ranking is exact cosine (run.py's "exact" rows); near-duplicate pHash promotion is left out (it never fires on
the rotated edits). Vectors are cached in bench/results/tmp/diagnose-SET-vectors.npz (delete it when the set changes).
`--set heldout` runs the same on pictures the benchmark never uses (see heldout()), to check that a change
made for the benchmark's misses generalises.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from bench.robustness.images import EDITS, Indexed, distractors, photos  # noqa: E402
from skimage import data as skdata  # noqa: E402

from imsrc.config import Settings  # noqa: E402
from imsrc.ingest.decode import make_thumbnail  # noqa: E402
from imsrc.search import rerank  # noqa: E402
from imsrc.search.service import decode_query  # noqa: E402

TMP = ROOT / "bench" / "results" / "tmp"


def heldout(step: int = 5) -> tuple[list[Indexed], list[Indexed]]:
    """(catalog, sources): pictures the benchmark never uses and nothing here was tuned on, small and
    low-texture on purpose: 300 Fashion-MNIST test images after the distractors (1000-1299, 28 px scaled to
    112 px) and scikit-image's 200 LFW faces (25 px scaled to 100 px); every `step`-th is a query source."""
    from imsrc.ingest.demo import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx

    images = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    out = [
        Indexed(
            f"fashion-{i:05d}",
            f"fashion {FASHION_CLASSES[labels[i]]}",
            Image.fromarray(images[i]).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC),
        )
        for i in range(1000, 1300)
    ]
    faces = np.load(Path(skdata.__file__).parent / "lfw_subset.npy")
    for i, face in enumerate(faces):
        grey = Image.fromarray((255 * face / max(float(face.max()), 1e-9)).astype(np.uint8))
        out.append(Indexed(f"lfw-{i:03d}", "faces", grey.convert("RGB").resize((100, 100), Image.Resampling.BICUBIC)))
    return out, out[::step]


def _embedder(inference: str) -> Any:
    from imsrc.embeddings.loading import load_embedder

    return load_embedder("efficientnet-lite0", Settings(inference=inference, _env_file=None))  # type: ignore[call-arg]


def _embed(embedder: Any, images: list[Image.Image]) -> np.ndarray:
    import torch

    out = []
    for i in range(0, len(images), 16):
        batch = torch.stack([torch.as_tensor(embedder.preprocess(im)) for im in images[i : i + 16]])
        out.append(np.asarray(embedder.encode_images(batch), dtype=np.float32))
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", default="rotated_12,rotated_12_brighter_30,mirrored,jpeg25_half")
    p.add_argument("--comparators", default="orb,sift")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--distractors", type=int, default=150)
    p.add_argument("--inference", default="onnx")
    p.add_argument("--set", choices=("bench", "heldout"), default="bench", help="heldout: see heldout()")
    p.add_argument("--verbose", action="store_true", help="print every query, not only the misses")
    args = p.parse_args()
    edits = args.edits.split(",")
    if args.set == "bench":
        indexed = photos()
        items = indexed + distractors(args.distractors)
    else:
        items, indexed = heldout()
    cache = TMP / f"diagnose-{args.set}-vectors.npz"
    names = [it.name for it in items]
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    thumbs = {}
    for i, it in enumerate(items):
        data, _, _ = make_thumbnail(it.image, settings.thumbnail_size)
        with Image.open(io.BytesIO(data)) as t:
            thumbs[i] = t.convert("RGB")
    queries = {
        (it.name, e): decode_query(EDITS[e][1](it.image, i), settings) for i, it in enumerate(indexed) for e in edits
    }
    keys = sorted(queries)
    cached = np.load(cache, allow_pickle=False) if cache.exists() else None
    if cached is not None and list(cached["names"]) == names and set(map(tuple, cached["qkeys"])) >= set(keys):
        cat = cached["catalog"]
        qv = dict(zip(map(tuple, cached["qkeys"]), cached["queries"], strict=True))
    else:
        emb = _embedder(args.inference)
        cat = _embed(emb, [it.image for it in items])
        qv = dict(zip(keys, _embed(emb, [queries[k] for k in keys]), strict=True))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache, names=np.array(names), catalog=cat, qkeys=np.array(keys), queries=np.stack([qv[k] for k in keys])
        )
    for comp in args.comparators.split(","):
        per_edit: dict[str, list[int]] = {}
        cost = []
        wrong: list[float] = []  # per query: the best score of a candidate that is not the source
        right: list[float] = []  # per query: the source's score
        for src, edit in keys:
            sims = cat @ qv[(src, edit)]
            order = list(np.argsort(-sims, kind="stable"))
            target = names.index(src)
            pre = order.index(target)
            cand = order[: args.top]
            t = time.perf_counter()
            sc = rerank.scores(comp, queries[(src, edit)], {int(c): thumbs[int(c)] for c in cand})
            cost.append((time.perf_counter() - t) * 1000 / len(cand))
            final = sorted(cand, key=lambda c: -sc[int(c)])  # stable: ties keep the embedding order
            rank = final.index(target) if target in final else args.top
            wrong.append(max((sc[int(c)] for c in cand if c != target), default=0.0))
            right.append(sc.get(target, 0.0))
            per_edit.setdefault(edit, []).append(rank)
            if rank != 0 or args.verbose:
                win = final[0]
                print(
                    f"{comp:9} {edit:24} {src:24} emb-rank {pre:2d} final {rank:2d} src {sc.get(target, '-')} "
                    f"| winner {names[win]} {sc[int(win)]} (emb-rank {order.index(win)}) | "
                    f"top3 emb {[names[c] for c in order[:3]]}",
                    flush=True,
                )
        print(
            comp,
            {e: round(sum(r == 0 for r in v) / len(v), 3) for e, v in per_edit.items()},
            f"cost {np.median(cost):.2f} ms/candidate;",
            f"wrong candidates scoring > 0 in {sum(w > 0 for w in wrong)} of {len(wrong)} queries (max {max(wrong)});",
            f"source scoring 0 in {sum(r == 0 for r in right)}, median source score {np.median(right)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
