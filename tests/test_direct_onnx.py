"""Processes whose towers all run on ONNX Runtime never import torch (issue 16: 0.3-0.5 GB per `serve` worker).

- The preprocessing in PIL + NumPy gives the torchvision transforms' arrays exactly, for every model family we
  ship ONNX for, on real pictures of every shape and mode.
- After one load with torch has recorded the model (embeddings.direct), a new process loads its verified ONNX
  exports without torch and gives the same vectors; a changed weights file or a tower that would run on torch
  sends the load back to torch.
- `import imsrc.api.app` imports no torch (so /health answers soon after a start), and a real `imsrc serve` worker
  that answered image searches and an upload with ONNX inference has no libtorch mapped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from imsrc.embeddings import direct
from imsrc.embeddings.preprocess import ImagePreprocess, spec_of
from imsrc.embeddings.registry import TINY_TEST, build_embedder
from imsrc.ingest.demo import DEBIAN_FASHION_MNIST, read_idx
from tests.fixtures.servers import live_server, serve_env
from tests.helpers import ROOT, make_image


def _pictures() -> list[Image.Image]:
    out = [Image.fromarray(getattr(data, n)()) for n in ("chelsea", "coffee", "astronaut", "rocket", "camera")]
    out.append(Image.fromarray(data.logo()))  # RGBA
    coins = Image.fromarray(data.coins())  # greyscale
    out += [coins, coins.convert("P"), coins.resize((1, 1)), coins.resize((3, 2))]
    out += [out[0].resize((2000, 3)), out[1].resize((4, 1500)), out[2].resize((224, 224))]
    images = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if images.exists():
        out += [Image.fromarray(a) for a in read_idx(images)[:8]]  # 28x28 greyscale, upscaled by every model
    return out


def _transforms() -> dict[str, object]:
    import open_clip

    from imsrc.embeddings import efficientnet, openclip, torchvision_models

    # open_clip's eval transform as create_model_and_transforms builds it: ViT-B-32 (224, the OpenAI mean/std)
    # and the tiny test architecture (64).
    return {
        "efficientnet-lite0": efficientnet.make_preprocess(),
        "open_clip ViT-B-32": open_clip.image_transform(224, is_train=False),
        "open_clip tiny": open_clip.image_transform(openclip.TINY_CONFIG["vision_cfg"]["image_size"], is_train=False),
        "resnet50": torchvision_models.make_preprocess(),
    }


def test_numpy_preprocessing_gives_the_torchvision_arrays() -> None:
    pictures = _pictures()
    for label, transform in _transforms().items():
        steps = spec_of(transform)
        assert steps is not None, label
        ours = ImagePreprocess(steps)
        worst = 0.0
        for image in pictures:
            expected = np.asarray(transform(image))  # type: ignore[operator]
            got = ours(image)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            assert got.shape == expected.shape, (label, image.size, image.mode)
            worst = max(worst, float(np.abs(got - expected).max()))
        assert worst <= 1e-6, (label, worst)
    # A transform with a step not translated here is not translated at all (the model keeps torch's).
    from torchvision import transforms as T

    assert spec_of(T.Compose([T.Grayscale(), T.ToTensor()])) is None


def test_clip_tokenizer_without_torch_gives_open_clips_ids() -> None:
    import open_clip

    from imsrc.embeddings.clip_tokenizer import CHECK_TEXTS, ClipTokenizer, matching, vocab_path

    theirs = open_clip.get_tokenizer("ViT-B-32")
    texts = [*CHECK_TEXTS, "Ünïcödé & <b>html</b> &lt;tags&gt;", "x" * 500, "don't STOP me now 1234567890"]
    vocab = vocab_path()
    assert vocab is not None
    ours = ClipTokenizer(vocab, 77)
    np.testing.assert_array_equal(ours(texts), np.asarray(theirs(texts)))
    assert matching(theirs) == {"vocab": vocab, "context_length": 77}
    assert matching(object()) is None


def _probe() -> str:
    return """
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from skimage import data
from imsrc.embeddings.registry import get_embedder
e = get_embedder(sys.argv[1], runtime="onnx", export_dir=Path(sys.argv[2]))
image = e.encode_images(e.preprocess(Image.fromarray(data.chelsea())))
out = {"base": e.base is None, "image": image.tolist(), "torch_after_image": "torch" in sys.modules,
       "towers": e.loaded_towers()}
if e.supports_text:
    out["text"] = e.encode_texts(["a cat", "a cup of coffee on a table"]).tolist()
print(json.dumps(out))
"""


def _run_probe(name: str, export_dir: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "backend")}
    result = subprocess.run(
        [sys.executable, "-c", _probe(), name, str(export_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


@pytest.mark.parametrize("name", [TINY_TEST, "efficientnet-lite0"])
def test_a_recorded_model_loads_its_onnx_towers_without_torch(name: str, tmp_path: Path) -> None:
    export_dir = tmp_path / "onnx"
    full = build_embedder(name, runtime="onnx", export_dir=export_dir)  # exports, verifies, records
    image = full.encode_images(full.preprocess(Image.fromarray(data.chelsea())))
    assert list(export_dir.glob("*/direct-*.json"))
    got = _run_probe(name, export_dir)
    assert got["base"] is True and got["torch_after_image"] is False
    assert got["towers"] == ["image"]  # the text towers wait for the first text (here: after the image)
    assert np.array_equal(np.asarray(got["image"], dtype=np.float32), image)
    if full.supports_text:
        texts = full.encode_texts(["a cat", "a cup of coffee on a table"])
        assert np.abs(np.asarray(got["text"], dtype=np.float32) - texts).max() <= 1e-6


def test_the_record_is_used_only_while_nothing_changed(tmp_path: Path) -> None:
    from imsrc.embeddings import efficientnet

    export_dir = tmp_path / "onnx"
    weights = tmp_path / "lite0.pth"
    shutil.copy(efficientnet.weights_path(), weights)
    build_embedder("efficientnet-lite0", runtime="onnx", export_dir=export_dir, checkpoint=str(weights))
    args = {"device": None, "precision": "auto", "checkpoint": str(weights), "cache_dir": None}
    assert direct.load("efficientnet-lite0", setting="onnx", export_dir=export_dir, **args) is not None
    # Another checkpoint file under the same name: the exports may be of other weights.
    os.utime(weights, ns=(1, 1))
    assert direct.load("efficientnet-lite0", setting="onnx", export_dir=export_dir, **args) is None
    # Back to the recorded weights, but the IMSRC_INFERENCE setting would leave a tower on torch (auto and a
    # recorded timing where torch won): the usual load decides.
    build_embedder("efficientnet-lite0", runtime="onnx", export_dir=export_dir, checkpoint=str(weights))
    assert direct.load("efficientnet-lite0", setting="onnx", export_dir=export_dir, **args) is not None
    manifest_path = next(export_dir.glob("efficientnet-lite0/*/image.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["timing"].update(torch_s=0.001, onnx_s=1.0)
    manifest_path.write_text(json.dumps(manifest))
    assert direct.load("efficientnet-lite0", setting="auto", export_dir=export_dir, **args) is None
    assert direct.load("efficientnet-lite0", setting="torch", export_dir=export_dir, **args) is None
    assert (
        direct.load("efficientnet-lite0", setting="onnx", export_dir=export_dir, **{**args, "precision": "bf16"})
        is None
    )


def test_importing_the_app_imports_no_torch() -> None:
    code = (
        "import sys, imsrc.api.app, imsrc.embeddings, imsrc.embeddings.registry, imsrc.ingest.service\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'open_clip', 'onnxruntime') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "backend")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-before", "first-start"])
def test_an_onnx_serve_worker_answers_without_torch(create_database, tmp_path: Path, recorded: bool) -> None:  # type: ignore[no-untyped-def]
    """A real `imsrc serve` worker with IMSRC_INFERENCE=onnx: image searches and an upload, no libtorch mapped;
    uploads into a new category compute its text prototype through the text tower and CLIP's tokenizer, still
    without torch, and a text query answers too. On a first start (nothing recorded yet) the torch load that
    exports and records runs in a child process, and the worker still never maps libtorch."""
    url = create_database(f"imsrc_direct_onnx_{int(recorded)}")
    cache = tmp_path / "models"
    if recorded:
        build_embedder(TINY_TEST, runtime="onnx", cache_dir=cache)  # the earlier load that recorded it (cache/onnx)
    env = serve_env(
        tmp_path / "data",
        database_url=url,
        model=TINY_TEST,
        IMSRC_INFERENCE="onnx",
        IMSRC_MODEL_CACHE_DIR=str(cache),
        IMSRC_SEARCH_WARMUP="false",
    )
    with (
        live_server(env, tmp_path / "serve.log", args=["--workers", "1"]) as server,
        httpx.Client(base_url=server.base, timeout=120) as client,
    ):
        for i in range(3):
            r = client.post("/api/images", data={"category": "things"}, files={"file": (f"{i}.png", make_image(i))})
            assert r.status_code == 200, r.text
        r = client.post("/api/search/image", params={"k": 3}, files={"file": ("q.png", make_image(1), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["score"] > 0.999
        status = client.get("/api/status").json()
        pid = int(status["worker_pid"])
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps, server.log_text()
        r = client.get("/api/search/text", params={"q": "a red square", "k": 3})
        assert r.status_code == 200, r.text
        assert r.json()["results"]
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
        assert ("first load with torch in a child process" in server.log_text(100_000)) is not recorded
        assert list((cache / "onnx").glob("*/direct-*.json"))
