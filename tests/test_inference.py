"""IMSRC_INFERENCE: the ONNX Runtime engine against torch, on a tiny random-init CLIP and the real EfficientNet-Lite0.

The engines must put vectors in the same space (cosine >= 0.9999 per image, same neighbours), a catalog indexed
with one must be searchable with the other, and a damaged export must be rebuilt, never run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from skimage import data

from imsrc.api.app import create_app
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.embeddings import build_embedder, get_embedder, onnx_export, runtime
from imsrc.embeddings.base import Embedder, TorchEmbedder
from imsrc.embeddings.errors import OnnxRuntimeMissingError
from imsrc.embeddings.onnx_cache import ExportStore, sha256_file, weights_fingerprint
from imsrc.embeddings.onnx_embedder import OnnxEmbedder
from imsrc.embeddings.registry import TINY_TEST, text_vectors
from imsrc.ingest.service import ingest_bytes
from tests.fixtures.database import database_for
from tests.helpers import make_image, run_cli

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "coins", "camera"]
TEXTS = ["a cat", "a cup of coffee", "an astronaut", "a rocket at night", "coins on a table"]
LONG_TEXT = "a long description of an old harbour at dusk with fishing boats, gulls, nets, ropes and a lighthouse"


@pytest.fixture(scope="module")
def model_cache() -> Iterator[Path]:
    """IMSRC_MODEL_CACHE_DIR for the module: exports land in model_cache/onnx (made once, reused by later tests)."""
    path = Path(tempfile.mkdtemp(prefix="imsrc-onnx-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def gallery() -> list[Image.Image]:
    """6 photos x 4 crops/mirrors: each photo's edits are its true neighbours."""
    out = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = im.size
        for i in range(4):
            m = (i % 2 + 1) * min(w, h) // 16
            crop = im.crop((m, m // 2, w - m // 2, h - m))
            out.append(ImageOps.mirror(crop) if i >= 2 else crop)
    return out


def _batch(embedder: Embedder, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([embedder.preprocess(im) for im in images])


def _neighbours(vectors: np.ndarray, k: int = 5) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1)[:, :k]


def _export_dir(model_cache: Path) -> Path:
    return model_cache / "onnx"


@pytest.mark.parametrize("name", [TINY_TEST, "efficientnet-lite0"])
def test_backends_agree(name: str, model_cache: Path, gallery: list[Image.Image]) -> None:
    torch_embedder = build_embedder(name, device="cpu", runtime="torch")
    onnx_embedder = build_embedder(name, runtime="onnx", export_dir=_export_dir(model_cache))
    assert isinstance(onnx_embedder, OnnxEmbedder)
    expected = {"image": "onnx", "text": "onnx"} if torch_embedder.supports_text else {"image": "onnx"}
    assert onnx_embedder.runtime == expected and torch_embedder.runtime == {k: "torch" for k in expected}
    # Every tower runs on ONNX, so the torch copy of the weights was freed (kept on the meta device).
    assert all(p.is_meta for p in onnx_embedder.base.module.parameters())
    # Same identity, so a catalog cannot tell which engine wrote a vector.
    assert (onnx_embedder.name, onnx_embedder.params, onnx_embedder.dimension) == (
        torch_embedder.name,
        torch_embedder.params,
        torch_embedder.dimension,
    )

    batch = _batch(torch_embedder, gallery)
    ref, got = torch_embedder.encode_images(batch), onnx_embedder.encode_images(batch)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(ref * got, axis=1).min() >= 0.9999
    assert (_neighbours(ref) == _neighbours(got)).all()
    # The single-query path (IO binding, batch 1) gives the batch path's vector.
    single = onnx_embedder.encode_images(batch[3])
    assert single.shape == (1, ref.shape[1]) and float(single[0] @ ref[3]) >= 0.9999
    if torch_embedder.supports_text:
        t_ref, t_got = torch_embedder.encode_texts(TEXTS), onnx_embedder.encode_texts(TEXTS)
        assert np.sum(t_ref * t_got, axis=1).min() >= 0.9999
        assert float(onnx_embedder.encode_texts(TEXTS[:1])[0] @ t_ref[0]) >= 0.9999

    # The export is recorded with its checksum, versions, verification and timing.
    store = ExportStore(_export_dir(model_cache), name, weights_fingerprint(torch_embedder.module))
    manifest = json.loads(store.manifest_path("image", "fp32").read_text())
    assert manifest["verified"] is True and manifest["sha256"] == sha256_file(store.model_path("image", "fp32"))
    assert manifest["identity"]["model"] == name and manifest["identity"]["torch"] == torch.__version__
    assert manifest["identity"]["onnxruntime"] and manifest["verification"]["min_cosine"] >= 0.9999
    assert manifest["timing"]["torch_s"] > 0 and manifest["timing"]["onnx_s"] > 0
    if torch_embedder.supports_text:
        # open_clip towers export attention as ONNX Runtime's fused operator (one node per layer, not ~60): the
        # tiny model has 2 layers per tower; the text towers are causal (unidirectional).
        for tower in ("image", "text", "text-short"):
            nodes = onnx.load(str(store.model_path(tower, "fp32"))).graph.node
            fused = [n for n in nodes if n.op_type == "Attention" and n.domain == "com.microsoft"]
            assert len(fused) == 2 and not any(n.op_type == "Softmax" for n in nodes), tower
            causal = {a.name: a.i for a in fused[0].attribute}.get("unidirectional", 0)
            assert causal == (tower != "image"), tower
        # Short queries run on the 16-position text tower, long ones on the full one; both give torch's vector.
        short = json.loads(store.manifest_path("text-short", "fp32").read_text())
        assert short["verified"] is True and short["verification"]["min_cosine"] >= 0.9999
        assert onnx_export.short_tokens(torch_embedder.tokenize([LONG_TEXT])) is None
        assert onnx_export.short_tokens(torch_embedder.tokenize(TEXTS)) is not None
        # Each batch runs only up to its last end-of-text ("a cat": start, 2 word pieces, end), through one
        # export whose sequence axis is dynamic.
        assert onnx_export.short_tokens(torch_embedder.tokenize(["a cat"])).shape == (1, 4)
        dims = onnx.load(str(store.model_path("text-short", "fp32"))).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
        for texts in ([LONG_TEXT], [TEXTS[0], LONG_TEXT], TEXTS[1:3]):
            got = onnx_embedder.encode_texts(texts)
            assert np.sum(got * torch_embedder.encode_texts(texts), axis=1).min() >= 0.9999


def test_single_queries_from_many_threads(model_cache: Path, gallery: list[Image.Image]) -> None:
    """Each thread has its own output buffer: concurrent batch-1 queries never see each other's vectors."""
    embedder = build_embedder(TINY_TEST, runtime="onnx", export_dir=_export_dir(model_cache))
    batch = _batch(embedder, gallery)
    expected = embedder.encode_images(batch)
    results: dict[int, list[np.ndarray]] = {}

    def work(t: int) -> None:
        results[t] = [embedder.encode_images(batch[(t + i) % len(batch)])[0] for i in range(40)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t, vectors in results.items():
        for i, v in enumerate(vectors):
            assert float(v @ expected[(t + i) % len(batch)]) >= 0.9999


def test_corrupt_or_mismatched_export_is_rebuilt(scratch: Path, caplog: pytest.LogCaptureFixture) -> None:
    export_dir = scratch / "onnx"
    first = build_embedder(TINY_TEST, runtime="onnx", export_dir=export_dir)
    assert isinstance(first, OnnxEmbedder) and isinstance(first.base, TorchEmbedder)
    store = ExportStore(export_dir, TINY_TEST, first.fingerprint)
    path, manifest_path = store.model_path("image", "fp32"), store.manifest_path("image", "fp32")
    good = sha256_file(path)

    # Flip bytes in the middle of the weights: the file still parses, so only the checksum can catch it.
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="imsrc.embeddings.runtime"):
        second = build_embedder(TINY_TEST, runtime="onnx", export_dir=export_dir)
    assert any("checksum" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert sha256_file(path) == good == json.loads(manifest_path.read_text())["sha256"]
    probe = _batch(second, [Image.fromarray(data.chelsea())])
    assert float(second.encode_images(probe)[0] @ first.encode_images(probe)[0]) >= 0.9999

    # A manifest made by other library versions (here: another torch) is not trusted either.
    manifest = json.loads(manifest_path.read_text())
    manifest["identity"]["torch"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imsrc.embeddings.runtime"):
        build_embedder(TINY_TEST, runtime="onnx", export_dir=export_dir)
    assert any("other torch/onnx versions" in r.getMessage() for r in caplog.records)
    assert json.loads(manifest_path.read_text())["identity"]["torch"] == torch.__version__

    # A truncated file (an interrupted copy) is rebuilt as well.
    path.write_bytes(path.read_bytes()[:1000])
    rebuilt = build_embedder(TINY_TEST, runtime="onnx", export_dir=export_dir)
    assert sha256_file(path) == good and rebuilt.runtime["image"] == "onnx"


def test_sessions_load_an_external_data_copy_of_each_export(scratch: Path) -> None:
    """ONNX Runtime keeps less memory per process when the weights sit outside the graph (onnx_layout): sessions
    load such a copy, made once beside the verified export, with the same outputs; a damaged copy is remade."""
    import onnxruntime as ort

    from imsrc.embeddings.onnx_layout import WEIGHTS, external_data_copy

    export_dir = scratch / "onnx"
    embedder = build_embedder(TINY_TEST, runtime="onnx", export_dir=export_dir)
    assert isinstance(embedder, OnnxEmbedder)
    path = ExportStore(export_dir, TINY_TEST, embedder.fingerprint).model_path("image", "fp32")
    copy = external_data_copy(path)
    weights = copy.with_name(WEIGHTS)
    assert copy != path and copy.parent == path.with_name("image.ext")
    assert weights.stat().st_size > 10 * copy.stat().st_size  # the graph without its tensors is small
    probe = _batch(embedder, [Image.fromarray(data.chelsea())]).numpy()
    inline = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = onnx_export.INPUT_NAMES["image"]
    np.testing.assert_array_equal(
        inline.run(None, {name: probe})[0], ort.InferenceSession(str(copy)).run(None, {name: probe})[0]
    )
    good = sha256_file(weights)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert external_data_copy(path) == copy and sha256_file(weights) == good


def test_failed_verification_falls_back_to_torch_once(
    scratch: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "MIN_COSINE", 1.5)  # no export can pass: stands in for a bad exporter
    with caplog.at_level(logging.WARNING, logger="imsrc.embeddings.runtime"):
        embedder = build_embedder(TINY_TEST, runtime="onnx", export_dir=scratch)
    assert not isinstance(embedder, OnnxEmbedder) and embedder.runtime == {"image": "torch", "text": "torch"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("image tower: ONNX export refused (min cosine" in w and "using torch" in w for w in warnings)
    assert all("\n" not in w for w in warnings)
    assert not list(scratch.rglob("*.onnx"))  # a refused file is never kept, so never run
    # The refusal is recorded: the next load does not export again, it just warns.
    manifests = list(scratch.rglob("image.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["verified"] is False
    mtime = manifests[0].stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imsrc.embeddings.runtime"):
        again = build_embedder(TINY_TEST, runtime="onnx", export_dir=scratch)
    assert again.runtime["image"] == "torch" and manifests[0].stat().st_mtime_ns == mtime
    assert not any("exporting" in r.getMessage() for r in caplog.records)


def test_auto_follows_the_recorded_timing(model_cache: Path) -> None:
    export_dir = _export_dir(model_cache)
    base = build_embedder(TINY_TEST, runtime="onnx", export_dir=export_dir)  # makes sure the exports exist
    assert isinstance(base, OnnxEmbedder)
    store = ExportStore(export_dir, TINY_TEST, base.fingerprint)
    paths = {tower: store.manifest_path(tower, "fp32") for tower in ("image", "text")}
    originals = {tower: p.read_text() for tower, p in paths.items()}
    try:
        # image: ONNX recorded faster; text: torch recorded faster -> auto splits the towers.
        for tower, onnx_s in [("image", 0.001), ("text", 0.5)]:
            manifest = json.loads(originals[tower])
            manifest["timing"].update(torch_s=0.01, onnx_s=onnx_s)
            paths[tower].write_text(json.dumps(manifest))
        embedder = build_embedder(TINY_TEST, runtime="auto", export_dir=export_dir)
        assert embedder.runtime == {"image": "onnx", "text": "torch"}
        # A tower left on torch keeps its weights (they are freed only when every tower runs on ONNX).
        assert isinstance(embedder, OnnxEmbedder) and not next(embedder.base.module.parameters()).is_meta
        assert embedder.encode_texts(TEXTS).shape == (len(TEXTS), embedder.dimension)
        assert runtime.planned(TINY_TEST, True, "auto", export_dir) == "image onnx, text torch"
        assert runtime.planned(TINY_TEST, True, "onnx", export_dir) == "onnx"  # explicit onnx ignores timing
    finally:
        for tower, text in originals.items():
            paths[tower].write_text(text)


def test_int8_is_opt_in_and_close(
    model_cache: Path, gallery: list[Image.Image], caplog: pytest.LogCaptureFixture
) -> None:
    export_dir = _export_dir(model_cache)
    torch_embedder = build_embedder(TINY_TEST, runtime="torch")
    int8 = build_embedder(TINY_TEST, runtime="onnx-int8", export_dir=export_dir)
    assert int8.runtime == {"image": "onnx-int8", "text": "onnx-int8"}
    batch = _batch(torch_embedder, gallery)
    cos = np.sum(torch_embedder.encode_images(batch) * int8.encode_images(batch), axis=1)
    assert cos.min() >= onnx_export.INT8_MIN_COSINE and cos.min() < 1.0  # quantized for real, yet close
    # Convolutional models have nothing dynamic int8 helps with: they run ONNX fp32 and say so.
    with caplog.at_level(logging.WARNING, logger="imsrc.embeddings.runtime"):
        conv = build_embedder("efficientnet-lite0", runtime="onnx-int8", export_dir=export_dir)
    assert conv.runtime == {"image": "onnx"}
    assert any("nothing to quantize" in r.getMessage() for r in caplog.records)


def test_missing_onnxruntime_is_one_line_error(monkeypatch: pytest.MonkeyPatch, create_database) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(runtime, "onnxruntime_installed", lambda: False)
    with pytest.raises(OnnxRuntimeMissingError, match="needs the Python package 'onnxruntime'"):
        build_embedder(TINY_TEST, runtime="onnx")
    # auto quietly keeps torch.
    assert build_embedder(TINY_TEST, runtime="auto").runtime == {"image": "torch", "text": "torch"}

    # The real CLI, in a process where the package cannot be imported.
    url = create_database("imsrc_onnx_missing")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-onnx-missing-"))
    try:
        (folder / "a.png").write_bytes(make_image(1))
        code = (
            "import sys; sys.modules['onnxruntime'] = None; from imsrc.cli.main import main; "
            f"sys.argv = ['imsrc', 'index', {str(folder)!r}]; main()"
        )
        result = run_cli_code(
            code,
            {
                "IMSRC_DATABASE_URL": url,
                "IMSRC_MODEL": TINY_TEST,
                "IMSRC_INFERENCE": "onnx",
                "IMSRC_DATA_DIR": str(folder / "data"),
            },
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "onnxruntime" in lines[0] and "IMSRC_INFERENCE=onnx" in lines[0], result.stderr


def run_cli_code(code: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMSRC_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_models_list_shows_the_engine(model_cache: Path, database_url: str) -> None:
    # efficientnet-lite0 was exported above (test_backends_agree); CLIP models were not.
    build_embedder("efficientnet-lite0", runtime="onnx", export_dir=_export_dir(model_cache))
    rows = {}
    for setting in ("torch", "onnx"):
        out = run_cli(
            "models",
            "list",
            "--json",
            env={
                "IMSRC_DATABASE_URL": database_url,
                "IMSRC_MODEL_CACHE_DIR": str(model_cache),
                "IMSRC_INFERENCE": setting,
            },
        )
        assert out.returncode == 0, out.stderr
        rows[setting] = {r["name"]: r["inference"] for r in json.loads(out.stdout)}
    assert set(rows["torch"].values()) == {"torch"}
    assert rows["onnx"]["efficientnet-lite0"] == "onnx"
    assert rows["onnx"]["clip-vit-b-32"] == "onnx (decided at first load)"
    table = run_cli(
        "models", "list", env={"IMSRC_DATABASE_URL": database_url, "IMSRC_INFERENCE": "torch", "COLUMNS": "200"}
    )
    assert table.returncode == 0 and "inference" in table.stdout


@pytest.fixture(scope="module")
def torch_catalog(create_database, model_cache: Path) -> Iterator[tuple[Settings, Database, dict[str, int]]]:  # type: ignore[no-untyped-def]
    """Images indexed with the torch engine."""
    url = create_database("imsrc_onnx_catalog")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-onnx-catalog-"))
    settings = Settings(
        database_url=url,
        data_dir=folder / "data",
        model=TINY_TEST,
        inference="torch",
        model_cache_dir=model_cache,
        _env_file=None,
    )  # type: ignore[call-arg]
    database = database_for(settings)
    files = [(f"img-{i}.png", make_image(500 + i, size=(64 + 4 * (i % 5), 48))) for i in range(24)]
    with database.session() as session:
        outcomes = ingest_bytes(session, get_embedder(TINY_TEST, runtime="torch"), files, settings=settings)
    ids = {name: int(o.image_id) for (name, _), o in zip(files, outcomes, strict=True) if o.image_id is not None}
    for name, data_ in files:
        (folder / name).write_bytes(data_)
    yield settings, database, ids
    database.dispose()
    shutil.rmtree(folder, ignore_errors=True)


def test_catalog_indexed_with_torch_is_searched_with_onnx(
    torch_catalog: tuple[Settings, Database, dict[str, int]],
) -> None:
    settings, database, ids = torch_catalog
    answers: dict[str, list[dict[str, object]]] = {}
    for engine in ("torch", "onnx"):
        # The text-vector LRU is keyed by model name, not engine: without this the ONNX pass would be served the
        # torch vector and compare it with itself.
        text_vectors.clear()
        engine_settings = settings.model_copy(update={"inference": engine})
        with TestClient(create_app(engine_settings, database=database)) as client:
            if engine == "onnx":  # before any query: predicted from the recorded exports
                status = client.get("/api/status").json()
                assert status["search_model"]["inference"] in ("onnx", "onnx (decided at first load)")
            for name in ("img-3.png", "img-17.png"):
                resp = client.post(
                    "/api/search/image?k=8&mode=exact",
                    files={
                        "file": (
                            name,
                            make_image(500 + int(name[4:-4]), size=(64 + 4 * (int(name[4:-4]) % 5), 48)),
                            "image/png",
                        )
                    },
                )
                assert resp.status_code == 200, resp.text
                body = resp.json()
                assert body["results"][0]["id"] == ids[name]
                assert body["timings_ms"]["embed"] > 0
                answers.setdefault(f"{engine}/{name}", body["results"])
            text = client.get("/api/search/text", params={"q": "a red square", "k": 8, "mode": "exact"})
            assert text.status_code == 200, text.text
            answers[f"{engine}/text"] = text.json()["results"]
            assert text.json()["timings_ms"]["embed"] > 0  # a new text query: the embedding is timed, not cached
            status = client.get("/api/status").json()
            assert status["search_model"]["inference"] == engine  # as loaded by the searches above
    for key in ("img-3.png", "img-17.png", "text"):
        a, b = answers[f"torch/{key}"], answers[f"onnx/{key}"]
        assert [r["id"] for r in a] == [r["id"] for r in b]
        assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-4)


def test_cli_index_and_search_under_auto(create_database, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    """The default setting end to end: `imsrc index` exports and picks engines; search finds what torch finds."""
    url = create_database("imsrc_onnx_auto")
    folder = Path(tempfile.mkdtemp(prefix="imsrc-onnx-auto-"))
    try:
        for i in range(6):
            (folder / f"img-{i}.png").write_bytes(make_image(900 + i))
        base = {
            "IMSRC_DATABASE_URL": url,
            "IMSRC_MODEL": TINY_TEST,
            "IMSRC_DATA_DIR": str(folder / "data"),
            "IMSRC_MODEL_CACHE_DIR": str(model_cache),
            "IMSRC_WORKERS": "1",
        }
        auto = {**base, "IMSRC_INFERENCE": "auto"}
        indexed = run_cli("index", str(folder), "--json", env=auto)
        assert indexed.returncode == 0, indexed.stderr
        listed = run_cli("models", "list", "--json", env=auto)
        row = next(r for r in json.loads(listed.stdout) if r["name"] == TINY_TEST)
        assert "first load" not in row["inference"] and row["inference"] != ""
        found = {}
        for engine in ("auto", "torch"):
            out = run_cli(
                "search",
                "image",
                str(folder / "img-2.png"),
                "--json",
                "-k",
                "4",
                "--exact",
                env={**base, "IMSRC_INFERENCE": engine},
            )
            assert out.returncode == 0, out.stderr
            found[engine] = json.loads(out.stdout)["results"]
        assert [r["id"] for r in found["auto"]] == [r["id"] for r in found["torch"]] and len(found["auto"]) == 4
        assert np.allclose([r["score"] for r in found["auto"]], [r["score"] for r in found["torch"]], atol=1e-4)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
