"""Where exported ONNX towers live, and when a file there may be trusted.

Each tower file (`image.onnx`, `text.onnx`, `image-int8.onnx`, ...) has a JSON manifest beside it recording the
file's sha256, the model's identity (name, params, a fingerprint of the weights), the torch / onnx /
onnxruntime versions it was made with, its verification against torch and its recorded timing. A file is used
only when its manifest matches the model being loaded and its checksum matches the bytes on disk; anything
else (a truncated copy, a file edited by hand, an export made by another torch) is rebuilt, never run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# 2: open_clip attention exported as ONNX Runtime's fused Attention operator (onnx_attention). 3: the short text
# tower takes any length up to its maximum. Exports of an older format are rebuilt once.
FORMAT = 3
OPSET = 17
_SAMPLES_PER_TENSOR = 4096


def default_export_dir(model_cache_dir: str | os.PathLike[str] | None) -> Path:
    """IMSRC_MODEL_CACHE_DIR/onnx when set, else the user's cache (~/.cache/imsrc/onnx): exports depend only on
    the weights, so catalogs share them."""
    if model_cache_dir:
        return Path(model_cache_dir).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imsrc" / "onnx"


@functools.cache
def torch_version() -> str | None:
    """torch.__version__ without importing torch (seconds, and 0.3 GB a process): read from torch/version.py, the
    file torch itself takes it from. The distribution's version (importlib.metadata) can differ ("2.14.1" for
    "2.14.1+cu130"), and exports record torch.__version__."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    return None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of the weights: every tensor's name, shape, dtype and an evenly strided sample of its
    values. Different checkpoints of one architecture differ in nearly every value, so a sample tells them
    apart without hashing hundreds of megabytes at every load."""
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].float().cpu().numpy().tobytes()
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(sample)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identity(name: str, params: dict[str, Any], fingerprint: str, tower: str, variant: str) -> dict[str, Any]:
    """What must be equal for an export to stand for this model: any change means a rebuild."""
    return {
        "format": FORMAT,
        "model": name,
        "tower": tower,
        "variant": variant,
        "params": json.loads(json.dumps(params, sort_keys=True, default=str)),
        "weights_fingerprint": fingerprint,
        "opset": OPSET,
        "torch": torch_version(),
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
    }


@dataclass(frozen=True)
class Lookup:
    manifest: dict[str, Any] | None  # None: nothing usable, export again
    reason: str  # why not, for the log ("" when usable)


class ExportStore:
    """The exports of one model (one weights fingerprint) under the export root."""

    def __init__(self, root: Path, model_name: str, fingerprint: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"
        self.fingerprint = fingerprint
        self.dir = root / safe / fingerprint[:16]

    def model_path(self, tower: str, variant: str) -> Path:
        return self.dir / (f"{tower}.onnx" if variant == "fp32" else f"{tower}-{variant}.onnx")

    def manifest_path(self, tower: str, variant: str) -> Path:
        return self.model_path(tower, variant).with_suffix(".json")

    @contextlib.contextmanager
    def lock(self, tower: str) -> Iterator[None]:
        """One exporter per tower across processes (e.g. `imsrc serve --workers 4` starting together)."""
        import fasteners

        self.dir.mkdir(parents=True, exist_ok=True)
        with fasteners.InterProcessLock(str(self.dir / f"{tower}.lock")):
            yield

    def lookup(self, tower: str, variant: str, expected: dict[str, Any]) -> Lookup:
        manifest_path = self.manifest_path(tower, variant)
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            return Lookup(None, "not exported yet")
        except (OSError, ValueError):
            return Lookup(None, "its manifest is unreadable")
        if not isinstance(manifest, dict) or manifest.get("identity") != expected:
            return Lookup(None, "it was made for other weights or other torch/onnx versions")
        if not manifest.get("verified"):
            return Lookup(manifest, "")  # a recorded refusal: not retried until the identity changes
        path = self.model_path(tower, variant)
        if not path.is_file() or sha256_file(path) != manifest.get("sha256"):
            return Lookup(None, "its checksum does not match (corrupt or modified file)")
        return Lookup(manifest, "")

    def save(self, tower: str, variant: str, manifest: dict[str, Any]) -> None:
        """Manifest last and atomically: a crash mid-export leaves no manifest, so the next load exports again."""
        path = self.manifest_path(tower, variant)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def recorded_runtimes(root: Path, model_name: str) -> dict[str, dict[str, Any]]:
    """The newest manifest per tower and variant for a model, without loading it (for status displays):
    {"image/fp32": manifest, ...}. Only manifests made with the installed torch/onnxruntime count."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    for path in (root / safe).glob("*/*.json"):
        try:
            manifest = json.loads(path.read_text())
            ident = manifest["identity"]
            key = f"{ident['tower']}/{ident['variant']}"
            stale = ident.get("torch") != torch_version() or ident.get("onnxruntime") != package_version("onnxruntime")
            mtime = path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not stale and (key not in found or found[key][0] < mtime):
            found[key] = (mtime, manifest)
    return {k: v for k, (_, v) in found.items()}
