"""Real labelled demo data: Fashion-MNIST (Debian's dataset-fashion-mnist, else torchvision's download)
and CIFAR-10 (torchvision's download). Images go through the same job pipeline as folders."""

from __future__ import annotations

import gzip
import io
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imsrc.errors import ImsrcError
from imsrc.ingest.decode import WorkItem

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DATASETS = ("fashion-mnist", "cifar10")
DOWNLOAD_TIMEOUT_S = 30


class DatasetUnavailableError(ImsrcError):
    status_code = 503
    code = "dataset_unavailable"


@dataclass
class Dataset:
    name: str
    source: str  # where it was read from, for the summary
    images: np.ndarray  # (n, h, w) uint8 grey or (n, h, w, 3) uint8 RGB
    labels: np.ndarray
    classes: list[str]

    def items(self, limit: int | None) -> Iterator[WorkItem]:
        n = len(self.images) if not limit else min(limit, len(self.images))
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(self.images[i]).save(buf, "PNG")
            yield WorkItem(
                key=f"{self.name}/test/{i:05d}.png", data=buf.getvalue(), category=self.classes[int(self.labels[i])]
            )


def read_idx(path: Path) -> np.ndarray:
    """The IDX format of (Fashion-)MNIST: big-endian magic (0, 0, dtype 0x08, ndim), dims, then bytes."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetUnavailableError(f"{path} is not an IDX file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(cache_dir: Path, folder: Path = DEBIAN_FASHION_MNIST) -> Dataset:
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        return Dataset("fashion-mnist", str(folder), read_idx(images), read_idx(labels), FASHION_CLASSES)
    return _torchvision(
        "fashion-mnist", cache_dir, hint=f"not installed at {folder} (Debian/Ubuntu: apt install dataset-fashion-mnist)"
    )


def load_cifar10(cache_dir: Path) -> Dataset:
    return _torchvision("cifar10", cache_dir, hint="CIFAR-10 is only available through torchvision's download")


def _torchvision(name: str, cache_dir: Path, hint: str) -> Dataset:
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.CIFAR10
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib would otherwise wait on a silent network forever
    try:
        data = cls(str(cache_dir), train=False, download=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetUnavailableError(
            f"cannot load {name}: {hint}, and the download failed ({reason}); check the network or proxy"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    images = np.asarray(data.data)
    return Dataset(name, f"torchvision download in {cache_dir}", images, np.asarray(data.targets), list(data.classes))


def load_dataset(name: str, cache_dir: Path) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(cache_dir)
    if name == "cifar10":
        return load_cifar10(cache_dir)
    raise ImsrcError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
