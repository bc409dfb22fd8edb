"""Model layer: real forward passes on a tiny random CLIP and on the PyPI-shipped EfficientNet-Lite0."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data

from imsrc.embeddings import (
    TextNotSupportedError,
    UnknownModelError,
    WeightsUnavailableError,
    build_embedder,
    get_embedder,
    known_models,
    resolve_model_name,
    torchvision_models,
)
from imsrc.embeddings import efficientnet as effnet_module
from imsrc.embeddings import openclip as openclip_module
from imsrc.embeddings.base import Embedder
from imsrc.embeddings.cache import TextVectorCache
from imsrc.embeddings.efficientnet import EfficientNetLite0Embedder
from imsrc.embeddings.registry import AUTO_FALLBACK_WARNING, TINY_TEST

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    names = ["chelsea", "coffee", "astronaut", "camera", "rocket", "coins", "immunohistochemistry", "page"]
    return {n: _pil(getattr(data, n)()) for n in names}


@pytest.fixture(scope="module")
def tiny() -> Embedder:
    return build_embedder(TINY_TEST, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Embedder:
    return EfficientNetLite0Embedder(device="cpu", precision="fp32")


def _batch(embedder: Embedder, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([embedder.preprocess(im) for im in images])


# --- tiny open_clip ------------------------------------------------------------------------------


def test_tiny_shapes_norms_and_shared_space(tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    imgs = tiny.encode_images(_batch(tiny, list(photos.values())[:3]))
    txts = tiny.encode_texts(["a cat", "a cup of coffee"])
    assert tiny.dimension == 64 and tiny.supports_text and tiny.family == "open_clip"
    assert imgs.shape == (3, 64) and txts.shape == (2, 64)
    assert imgs.dtype == np.float32 and txts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txts, axis=1), 1.0, atol=1e-5)
    # Real outputs, not a constant: different inputs give clearly different vectors.
    assert float(imgs[0] @ imgs[1]) < 0.999
    assert float(txts[0] @ txts[1]) < 0.999


def test_tiny_is_deterministic_across_instances(tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    torch.manual_seed(1234)  # the factory must not depend on (or leak into) the global RNG
    other = build_embedder(TINY_TEST, device="cpu", precision="fp32")
    batch = _batch(tiny, [photos["chelsea"], photos["rocket"]])
    np.testing.assert_allclose(tiny.encode_images(batch), other.encode_images(batch), atol=1e-6)
    np.testing.assert_allclose(tiny.encode_texts(["x y"]), other.encode_texts(["x y"]), atol=1e-6)
    assert tiny.params == other.params


def test_tiny_batch_equals_one_by_one(tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    batch = _batch(tiny, list(photos.values()))
    together = tiny.encode_images(batch)
    alone = np.concatenate([tiny.encode_images(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    texts = ["a cat", "a rocket on a launch pad", "coins"]
    np.testing.assert_allclose(
        tiny.encode_texts(texts), np.concatenate([tiny.encode_texts([t]) for t in texts]), atol=1e-5
    )


def test_bf16_autocast_stays_close_to_fp32(tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    bf16 = build_embedder(TINY_TEST, device="cpu", precision="bf16")
    batch = _batch(tiny, list(photos.values()))
    low, full = bf16.encode_images(batch), tiny.encode_images(batch)
    assert low.dtype == np.float32
    assert float(np.min(np.sum(low * full, axis=1))) > 0.99


def test_checkpoint_file_is_loaded(tmp_path: Path, tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    openclip_module.ensure_tiny_config()
    torch.manual_seed(7)
    model, _, _ = open_clip.create_model_and_transforms(openclip_module.TINY_CONFIG_NAME, pretrained=None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    loaded = build_embedder(f"open_clip:{openclip_module.TINY_CONFIG_NAME}:none", checkpoint=str(ckpt))
    batch = _batch(tiny, [photos["coffee"]])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.eval().encode_image(batch), dim=-1).numpy()
    np.testing.assert_allclose(loaded.encode_images(batch), expected, atol=1e-5)
    assert not np.allclose(loaded.encode_images(batch), tiny.encode_images(batch), atol=1e-3)


# --- preprocess in worker processes --------------------------------------------------------------


def _preprocessors(tiny: Embedder) -> list:
    return [tiny.preprocess, effnet_module.make_preprocess(), torchvision_models.make_preprocess()]


def test_preprocess_pickle_round_trip(tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    for pre in _preprocessors(tiny):
        clone = pickle.loads(pickle.dumps(pre))
        for im in (photos["chelsea"], photos["camera"]):  # RGB and greyscale
            out = pre(im)
            assert out.dtype == torch.float32 and out.ndim == 3 and out.shape[0] == 3
            assert torch.equal(clone(im), out)


def test_preprocess_runs_in_spawned_worker(tiny: Embedder, photos: dict[str, Image.Image]) -> None:
    images = [photos["chelsea"], photos["camera"]]
    # spawn, not fork: the worker starts from nothing, like ingest workers on macOS/Windows.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for pre in _preprocessors(tiny):
            remote = list(pool.map(pre, images))
            for im, out in zip(images, remote, strict=True):
                assert torch.equal(out, pre(im))


# --- EfficientNet-Lite0 with the shipped weights -------------------------------------------------


def _top5(effnet: EfficientNetLite0Embedder, im: Image.Image) -> set[int]:
    logits = effnet.classify(effnet.preprocess(im).unsqueeze(0))
    return set(logits.topk(5, dim=1).indices[0].tolist())


def test_efficientnet_imagenet_predictions(effnet: EfficientNetLite0Embedder, photos: dict[str, Image.Image]) -> None:
    assert _top5(effnet, photos["chelsea"]) & CAT_CLASSES
    assert ESPRESSO in _top5(effnet, photos["coffee"])


def test_efficientnet_features_find_the_edited_copy(
    effnet: EfficientNetLite0Embedder, photos: dict[str, Image.Image]
) -> None:
    names = list(photos)
    gallery = effnet.encode_images(_batch(effnet, list(photos.values())))
    assert gallery.shape == (len(names), 1280)
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    for target in ("chelsea", "astronaut", "rocket"):
        im = photos[target]
        w, h = im.size
        edited = ImageOps.mirror(im.crop((w // 12, h // 12, w - w // 12, h - h // 12)))
        query = effnet.encode_images(_batch(effnet, [edited]))[0]
        scores = gallery @ query
        assert names[int(np.argmax(scores))] == target, dict(zip(names, scores.round(3), strict=True))


def test_efficientnet_batch_equals_one_by_one(
    effnet: EfficientNetLite0Embedder, photos: dict[str, Image.Image]
) -> None:
    batch = _batch(effnet, list(photos.values())[:4])
    alone = np.concatenate([effnet.encode_images(batch[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(effnet.encode_images(batch), alone, atol=1e-5)


def test_text_on_image_only_model_is_a_domain_error(effnet: EfficientNetLite0Embedder) -> None:
    assert not effnet.supports_text
    with pytest.raises(TextNotSupportedError) as err:
        effnet.encode_texts(["a cat"])
    assert err.value.status_code == 400 and err.value.code == "text_not_supported"


def test_resnet50_architecture_gives_pooled_2048d() -> None:
    resnet = torchvision_models.ResNet50Embedder(device="cpu", random_init=True)
    out = resnet.encode_images(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 2048) and resnet.dimension == 2048
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


# --- registry ------------------------------------------------------------------------------------


def test_auto_falls_back_offline_with_one_warning(tmp_path: Path) -> None:
    start = time.monotonic()
    name, warning = resolve_model_name("auto", None, cache_dir=tmp_path)
    assert time.monotonic() - start < 2.0  # no network attempt
    assert name == "efficientnet-lite0"
    assert warning == AUTO_FALLBACK_WARNING
    assert "text search" in warning and "IMSRC_MODEL_CHECKPOINT" in warning


def test_auto_picks_clip_when_cached_or_configured(tmp_path: Path) -> None:
    # Lay out a Hugging Face cache entry the way hf_hub_download leaves it.
    repo = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    assert resolve_model_name("auto", None, cache_dir=str(tmp_path)) == ("clip-vit-b-32", None)
    assert resolve_model_name("auto", "/some/ckpt.pt", cache_dir=str(tmp_path / "empty")) == (
        "clip-vit-b-32",
        None,
    )
    assert resolve_model_name("resnet50") == ("resnet50", None)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve_model_name("vit-huge-9000")
    message = str(err.value)
    assert err.value.status_code == 404 and err.value.code == "unknown_model"
    for name in ("clip-vit-b-32", "efficientnet-lite0", "resnet50", "siglip-vit-b-16"):
        assert name in message
    with pytest.raises(UnknownModelError, match="open_clip:ViT-B-32:openai"):
        get_embedder("open_clip:ViT-B-32:no-such-tag")


def test_missing_weights_without_download_is_503(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="IMSRC_MODEL_CHECKPOINT") as err:
        build_embedder("clip-vit-b-32", cache_dir=str(tmp_path), allow_download=False)
    assert err.value.status_code == 503


def test_known_models_report_dimensions_and_weights() -> None:
    infos = {m.name: m for m in known_models()}
    assert TINY_TEST not in infos
    assert infos["efficientnet-lite0"].weights_present and infos["efficientnet-lite0"].dimension == 1280
    assert infos["clip-vit-b-32"].dimension == 512 and infos["clip-vit-b-32"].supports_text
    assert infos["resnet50"].family == "torchvision" and not infos["resnet50"].supports_text


def test_get_embedder_loads_once_across_threads() -> None:
    barrier = threading.Barrier(4)

    def load(_: int) -> Embedder:
        barrier.wait()
        return get_embedder(TINY_TEST, device="cpu", precision="fp32")

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(load, range(4)))
    assert all(e is got[0] for e in got)


# --- text vector LRU -----------------------------------------------------------------------------


class _Counting:
    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return self.inner.encode_texts(texts)


def test_text_cache_reuses_vectors(tiny: Embedder) -> None:
    cache = TextVectorCache(maxsize=2)
    counting = _Counting(tiny)
    first = cache.get(counting, "a cat")  # type: ignore[arg-type]
    again = cache.get(counting, "a cat")  # type: ignore[arg-type]
    assert again is first and counting.calls == 1
    np.testing.assert_allclose(first, tiny.encode_texts(["a cat"])[0], atol=1e-6)
    assert not first.flags.writeable
    cache.get(counting, "a dog")  # type: ignore[arg-type]
    cache.get(counting, "a bird")  # type: ignore[arg-type]  # evicts "a cat", the least recent
    assert counting.calls == 3
    cache.get(counting, "a cat")  # type: ignore[arg-type]
    assert counting.calls == 4 and len(cache) == 2


def test_auto_precision_is_fp32_on_cpu(tiny: Embedder) -> None:
    from imsrc.embeddings.base import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # see the decision note in base.py
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError):
        resolve_precision("int4", torch.device("cpu"))
