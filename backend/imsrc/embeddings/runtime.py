"""IMSRC_INFERENCE: which engine runs each tower of a model.

- torch: the torch modules as loaded.
- onnx: ONNX Runtime on the CPU, fp32, for every tower whose export matched torch (cosine >= 0.9999 per item on
  a fixed check batch); a tower that did not stays on torch, with a one-line warning.
- onnx-int8 (opt-in): dynamic int8 quantization of the ONNX graph. It moves vectors a little (neighbour agreement
  in BENCHMARKS.md), so it is never chosen by auto.
- auto (default): onnx per tower where onnxruntime is installed, the export verified, and its recorded timing at
  export beat torch's; torch otherwise (also on CUDA and for bf16, where torch is the fast path).

Exports are made once per model, weights and library versions (see onnx_cache), under a cross-process lock.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imsrc.embeddings.base import Embedder
from imsrc.embeddings.errors import InferenceConfigError, OnnxRuntimeMissingError
from imsrc.embeddings.onnx_cache import ExportStore, identity, recorded_runtimes
from imsrc.embeddings.onnx_names import SHORT_TEXT_TOKENS

if TYPE_CHECKING:
    import torch

    from imsrc.embeddings.torch_base import TorchEmbedder

log = logging.getLogger(__name__)

Inference = Literal["auto", "torch", "onnx", "onnx-int8"]
CHOICES: tuple[str, ...] = ("auto", "torch", "onnx", "onnx-int8")
ONNX_SETTINGS = ("onnx", "onnx-int8")
# Dynamic int8 pays off for matrix multiplies (transformers). For convolutions it produces ConvInteger, which
# ONNX Runtime's CPU kernels ran ~10x slower than fp32 on EfficientNet-Lite0 with cosine 0.970 (bench/embed), so
# the convolutional families have nothing worth quantizing dynamically and run ONNX fp32 under onnx-int8.
INT8_OPS: dict[str, list[str] | None] = {"open_clip": None}


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def check_setting(setting: str) -> None:
    """Fail early, in one line, when the setting cannot work on this installation."""
    if setting not in CHOICES:
        raise InferenceConfigError(f"IMSRC_INFERENCE must be one of {', '.join(CHOICES)}; got {setting!r}")
    if setting in ONNX_SETTINGS and not onnxruntime_installed():
        raise OnnxRuntimeMissingError(setting)


def describe(runtime: dict[str, str]) -> str:
    """{"image": "onnx", "text": "onnx"} -> "onnx"; mixed towers -> "image onnx, text torch"."""
    values = set(runtime.values())
    if len(values) == 1:
        return values.pop()
    return ", ".join(f"{tower} {engine}" for tower, engine in runtime.items())


def with_runtime(
    embedder: Embedder, setting: str, export_dir: Path, load_args: dict[str, Any] | None = None
) -> Embedder:
    """The embedder to use under `setting`: the torch one, or an OnnxEmbedder wrapping it. `load_args`
    (checkpoint, cache_dir) say how it was loaded: when every tower runs on ONNX, they are recorded so that the
    next process can load the ONNX towers without torch (embeddings.direct)."""
    check_setting(setting)
    if setting == "torch" or (setting == "auto" and not onnxruntime_installed()):
        return embedder
    from imsrc.embeddings.torch_base import TorchEmbedder

    if not isinstance(embedder, TorchEmbedder):
        return embedder
    if embedder.device.type != "cpu" or embedder.precision != "fp32":
        if setting == "auto":
            return embedder
        raise InferenceConfigError(
            f"IMSRC_INFERENCE={setting} runs fp32 on the CPU, but the model is set up for "
            f"{embedder.device.type} {embedder.precision}; set IMSRC_DEVICE=cpu and IMSRC_PRECISION=auto, "
            "or IMSRC_INFERENCE=torch"
        )
    from imsrc.embeddings.onnx_cache import weights_fingerprint
    from imsrc.embeddings.onnx_embedder import OnnxEmbedder

    store = ExportStore(export_dir, embedder.name, weights_fingerprint(embedder.module))

    def prepared(tower: str, variant: str) -> dict[str, Any] | None:
        return _prepared(embedder, store, tower, variant)

    short = embedder.short_text_graph(SHORT_TEXT_TOKENS) is not None
    chosen = choose_towers(embedder.name, embedder.family, embedder.supports_text, short, store, setting, prepared)
    if not chosen:
        return embedder
    runtime = {**embedder.runtime, **{t: label for t, (_, label) in chosen.items() if t != "text-short"}}
    towers = {tower: path for tower, (path, _) in chosen.items()}
    onnx_embedder = OnnxEmbedder.around(embedder, towers, runtime, store.fingerprint)
    if all(tower in towers for tower in runtime):
        if load_args is not None:
            from imsrc.embeddings import direct

            direct.record(embedder, onnx_embedder, export_dir, **load_args)
        # Nothing runs on torch any more; tokenizer and preprocessing stay. The text towers' sessions are made on
        # the first text query, from the verified exports.
        embedder.release_weights()
        trim_heap()
    return onnx_embedder


Prepared = Callable[[str, str], "dict[str, Any] | None"]


def choose_towers(
    name: str,
    family: str,
    supports_text: bool,
    short_text: bool,
    store: ExportStore,
    setting: str,
    prepared: Prepared,
) -> dict[str, tuple[Path, str]]:
    """{tower: (ONNX file, label)} for each tower that runs on ONNX under `setting`, from the exports'
    manifests (`prepared(tower, variant)`: the manifest of a usable or recorded-as-refused export, or None).
    "text-short" (the model has a short text tower) comes with "text" when its export stands (same engine and
    variant)."""
    out: dict[str, tuple[Path, str]] = {}
    for tower in ["image", "text"] if supports_text else ["image"]:
        chosen = _choose(name, family, store, tower, setting, prepared)
        if chosen is not None:
            out[tower] = chosen
    if "text" in out and short_text:
        # Short queries (most) skip the padding positions; same engine and variant as the full text tower.
        chosen = _choose(name, family, store, "text-short", setting, prepared)
        if chosen is not None:
            out["text-short"] = chosen
    return out


def trim_heap() -> None:
    """Hand memory freed by the C heap back to the OS. The torch weights just released (and the export's and the
    sessions' temporary buffers) leave free pages inside glibc's heap that it keeps: with CLIP ViT-B/32 174 MB of
    them per process (each `serve` worker), returned by one malloc_trim. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _choose(
    name: str, family: str, store: ExportStore, tower: str, setting: str, prepared: Prepared
) -> tuple[Path, str] | None:
    """(file, label) for this tower under the setting, or None for torch."""
    fp32 = prepared(tower, "fp32")
    if fp32 is None:
        return None
    if not fp32["verified"]:
        log.warning("%s %s tower: ONNX export refused (%s); using torch", name, tower, fp32.get("refused", "?"))
        return None
    if setting == "auto":
        t = fp32.get("timing") or {}
        if not t.get("onnx_s", 0) or t["onnx_s"] >= t.get("torch_s", 0):
            log.info("%s %s tower: torch was faster at export (%s); auto keeps torch", name, tower, t)
            return None
        return store.model_path(tower, "fp32"), "onnx"
    if setting == "onnx-int8":
        if family not in INT8_OPS:
            log.warning(
                "%s: dynamic int8 has nothing to quantize in a convolutional model (int8 convolutions ran slower "
                "than fp32); %s tower runs ONNX fp32",
                name,
                tower,
            )
            return store.model_path(tower, "fp32"), "onnx"
        int8 = prepared(tower, "int8")
        if int8 is None or not int8["verified"]:
            reason = int8.get("refused", "?") if int8 else "quantization failed"
            log.warning("%s %s tower: int8 refused (%s); running ONNX fp32", name, tower, reason)
            return store.model_path(tower, "fp32"), "onnx"
        return store.model_path(tower, "int8"), "onnx-int8"
    return store.model_path(tower, "fp32"), "onnx"


def _prepared(embedder: TorchEmbedder, store: ExportStore, tower: str, variant: str) -> dict[str, Any] | None:
    """The manifest of a usable (or recorded-as-refused) export, making it first if needed; None when the
    export itself failed (the reason is logged once as a warning)."""
    expected = identity(embedder.name, embedder.params, store.fingerprint, tower, variant)
    found = store.lookup(tower, variant, expected)
    if found.manifest is not None:
        return found.manifest
    with store.lock(tower):
        found = store.lookup(tower, variant, expected)  # another process may have made it meanwhile
        if found.manifest is not None:
            return found.manifest
        if found.reason != "not exported yet":
            log.warning("%s %s tower: rebuilding the %s ONNX export: %s", embedder.name, tower, variant, found.reason)
        else:
            log.info("%s %s tower: exporting to ONNX (%s), once", embedder.name, tower, variant)
        try:
            manifest = _build(embedder, store, tower, variant)
        except Exception as exc:  # the exporter and quantizer raise anything from tracing to protobuf errors
            log.warning(
                "%s %s tower: ONNX %s export failed (%s); using torch",
                embedder.name,
                tower,
                variant,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return None
        manifest["identity"] = expected
        store.save(tower, variant, manifest)
        return manifest


def _build(embedder: TorchEmbedder, store: ExportStore, tower: str, variant: str) -> dict[str, Any]:
    import torch

    from imsrc.embeddings import onnx_export
    from imsrc.embeddings.onnx_cache import sha256_file
    from imsrc.embeddings.onnx_embedder import make_session, normalise
    from imsrc.embeddings.onnx_layout import remove_copy

    started = time.perf_counter()
    path = store.model_path(tower, variant)
    prepare: Any = None  # what the embedder does to its input before this file sees it
    if tower == "image":
        inputs = torch.stack([embedder.preprocess(im) for im in onnx_export.check_images()])
        graph = exported = embedder.image_graph()
    else:
        inputs = embedder.tokenize(onnx_export.PROMPTS)
        graph = exported = embedder.text_graph()
        if tower == "text-short":
            exported = embedder.short_text_graph(onnx_export.SHORT_TEXT_TOKENS) or graph
            prepare = onnx_export.short_tokens

    def torch_fn(x: torch.Tensor) -> Any:
        with torch.inference_mode():  # the graph the torch path runs, on the full input, normalised as it does
            return normalise(graph(x).float().numpy())

    if variant == "fp32":
        example = prepare(inputs[:2]) if prepare else inputs[:2]
        onnx_export.export(exported, example, tower, path, embedder.export_context(tower))
    else:
        source = store.model_path(tower, "fp32")  # _choose made and verified it first
        onnx_export.quantize(source, path, INT8_OPS.get(embedder.family))
    session = make_session(path)
    input_name = onnx_export.INPUT_NAMES[tower]

    def onnx_fn(x: torch.Tensor) -> Any:
        x = prepare(x) if prepare else x
        return normalise(session.run([onnx_export.OUTPUT_NAME], {input_name: x.numpy()})[0])

    check = onnx_export.compare(torch_fn, onnx_fn, inputs, inputs[:1])
    threshold = onnx_export.MIN_COSINE if variant == "fp32" else onnx_export.INT8_MIN_COSINE
    manifest: dict[str, Any] = {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "verification": {**check, "threshold": threshold},
        "verified": check["min_cosine"] >= threshold,
    }
    if manifest["verified"]:
        manifest["timing"] = onnx_export.timing(torch_fn, onnx_fn, inputs, len(inputs))
    else:
        manifest["refused"] = f"min cosine {check['min_cosine']:.6f} < {threshold} vs torch on the check batch"
        path.unlink(missing_ok=True)  # never run; the manifest keeps the refusal so it is not retried each load
        remove_copy(path)
    manifest["export_s"] = time.perf_counter() - started
    return manifest


def planned(name: str, supports_text: bool, setting: str, export_dir: Path) -> str:
    """What a load would pick, from the recorded manifests, without loading the model (for status displays)."""
    if setting == "torch":
        return "torch"
    if not onnxruntime_installed():
        return "torch" if setting == "auto" else f"{setting} unavailable: onnxruntime not installed"
    records = recorded_runtimes(export_dir, name)
    runtime: dict[str, str] = {}
    for tower in ["image", "text"] if supports_text else ["image"]:
        m = records.get(f"{tower}/fp32")
        if m is None:
            runtime[tower] = f"{setting} (decided at first load)"
        elif not m.get("verified"):
            runtime[tower] = "torch"
        elif setting == "auto":
            t = m.get("timing") or {}
            runtime[tower] = "onnx" if 0 < t.get("onnx_s", 0) < t.get("torch_s", 0) else "torch"
        elif setting == "onnx-int8" and (records.get(f"{tower}/int8") or {}).get("verified"):
            runtime[tower] = "onnx-int8"
        else:
            runtime[tower] = "onnx"
    return describe(runtime)
