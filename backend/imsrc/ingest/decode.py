"""Per-file work, run in worker processes (and in-process for uploads): read once, hash, decode, pHash,
thumbnail, model preprocessing. Every failure becomes a one-line reason, never an exception."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imsrc import imaging
from imsrc.imaging import model_image, phash64, sniff
from imsrc.timings import stage

__all__ = ["DecodeFailure", "DecodeOptions", "Processed", "WorkItem", "model_image", "open_image", "process", "sniff"]

Preprocess = Callable[[Image.Image], "object"]


@dataclass(slots=True)
class WorkItem:
    """One thing to ingest: a file path to read, or bytes already in memory (uploads, demo data)."""

    key: str  # what is recorded: the path (valid UTF-8) or the upload's name
    path: str | None = None
    data: bytes | None = None
    category: str | None = None
    fail_reason: str | None = None  # the scanner already knows it cannot be ingested


@dataclass(slots=True)
class Processed:
    key: str
    category: str | None
    path: str | None
    ok: bool
    reason: str | None = None
    sha256: bytes | None = None
    byte_size: int = 0
    mtime_ns: int = 0
    data: bytes | None = None  # the original bytes, kept only when they are to be stored
    width: int = 0
    height: int = 0
    format: str = ""
    phash: int | None = None  # 64 bits, first bit most significant (imagehash's order)
    thumb: bytes | None = None
    thumb_width: int = 0
    thumb_height: int = 0
    tensor: np.ndarray | None = None
    vector: np.ndarray | None = None  # set by the parent after batched embedding


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    preprocess: Preprocess | None
    max_pixels: int
    thumbnail_size: int = 256
    keep_bytes: bool = False
    thumbnails: bool = True
    phash: bool = True


class DecodeFailure(Exception):
    """A file that cannot be ingested; the message is the reason recorded for it."""


def read_file(path: str) -> tuple[bytes, int, int]:
    """(bytes, size, mtime_ns), read once. O_NONBLOCK so a FIFO swapped in after the scan cannot hang us."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise DecodeFailure("broken symbolic link (its target does not exist)") from exc
        raise DecodeFailure("file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise DecodeFailure("permission denied: the file cannot be read") from exc
    except OSError as exc:
        raise DecodeFailure(f"cannot open file: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeFailure("not a regular file")
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise DecodeFailure("not a regular file") from exc
        raise DecodeFailure(f"cannot read file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return data, len(data), st.st_mtime_ns


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The bounded working image (see imaging.decode), or DecodeFailure with the reason."""
    return decode_bytes(data, max_pixels).image


def decode_bytes(data: bytes, max_pixels: int) -> imaging.Decoded:
    try:
        return imaging.decode(data, max_pixels=max_pixels)
    except imaging.ImageDecodeError as exc:
        raise DecodeFailure(exc.message) from exc


def make_thumbnail(img: Image.Image, size: int) -> tuple[bytes, int, int]:
    thumb = (
        img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        if img.mode not in ("RGB", "RGBA")
        else img.copy()
    )
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)  # never enlarges
    buf = io.BytesIO()
    thumb.save(buf, "WEBP", quality=80, method=4)
    return buf.getvalue(), thumb.width, thumb.height


def process(item: WorkItem, options: DecodeOptions) -> Processed:
    out = Processed(key=item.key, category=item.category, path=item.path, ok=False)
    try:
        if item.fail_reason:
            raise DecodeFailure(item.fail_reason)
        if item.data is not None:
            data, out.byte_size = item.data, len(item.data)
        elif item.path is not None:
            data, out.byte_size, out.mtime_ns = read_file(item.path)
        else:
            raise DecodeFailure("nothing to read")
        out.sha256 = hashlib.sha256(data).digest()
        decoded = decode_bytes(data, options.max_pixels)
        img = decoded.image
        out.width, out.height, out.format = decoded.width, decoded.height, decoded.format
        rgb = model_image(img)
        if options.phash:
            out.phash = phash64(rgb)
        if options.thumbnails:
            with stage("thumbnail"):  # part of decode
                out.thumb, out.thumb_width, out.thumb_height = make_thumbnail(img, options.thumbnail_size)
        if options.preprocess is not None:
            tensor = options.preprocess(rgb)
            out.tensor = np.ascontiguousarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.float32)
        if options.keep_bytes:
            out.data = data
        out.ok = True
    except DecodeFailure as exc:
        out.reason = str(exc)
    except MemoryError:
        out.reason = "out of memory while decoding this image"
    except Exception as exc:  # a decoder bug must cost one file, not the run
        out.reason = f"cannot process image: {type(exc).__name__}: {exc}"
    return out


# ------------------------------------------------------------------ worker processes
_options: DecodeOptions | None = None


def init_worker(options: DecodeOptions) -> None:
    """Runs once in each worker process."""
    import signal

    global _options
    # Ctrl-C goes to the whole process group; the parent decides when to stop, workers just finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    torch = sys.modules.get("torch")  # only when the preprocessing is torch's (unpickled before this runs)
    if torch is not None:
        torch.set_num_threads(1)  # parallelism comes from the processes; threads here would fight the model
    # Decoding costs ~2 ms an image, the model tens of ms: at a lower priority the workers take only what
    # the model's threads leave idle, and an OpenMP team that loses a thread to a worker stalls as a whole.
    with contextlib.suppress(AttributeError, OSError):
        os.nice(5)
    from imsrc.formats import configure_pillow

    configure_pillow(options.max_pixels)
    _options = options


def _exit_with_parent() -> None:
    """A SIGKILLed parent cannot shut its pool down, and pool workers hold both ends of their task pipe,
    so they would wait forever. Watch the parent's sentinel and leave when it dies."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="imsrc-parent-watch", daemon=True).start()


def process_chunk(items: list[WorkItem]) -> list[Processed]:
    assert _options is not None, "init_worker was not run"
    return [process(item, _options) for item in items]
