"""Decoding untrusted image bytes with bounded memory: the one decoder behind uploads, search queries and
folder indexing.

- Only the documented formats are decoded, recognised by content (Pillow's `formats=` allow-list), never by
  file name: JPEG, PNG, WebP, GIF, BMP, TIFF, plus HEIF/AVIF where a codec is installed. Everything else
  Pillow could open (TGA, PPM, ICO, QOI, JPEG 2000, ...) is refused before any pixel is decoded.
- The pixel count is read from the header and checked before decoding.
- Big images are decoded small: JPEG through `draft` (the codec decodes at 1/2, 1/4 or 1/8 scale), other
  formats are converted and `reduce`d in horizontal strips, so besides the decoded pixels only a strip and the
  small result are ever held. 16-bit images are scaled to 8 bits per strip (a whole-image float64 copy of a
  small 16-bit PNG once cost 2 GB).
- The working image that comes out is in one of four modes (L, LA, RGB, RGBA), upright (EXIF orientation
  applied), and at most a few megapixels: enough for thumbnails, pHash and every model's input.
- `DecodeGate` bounds how many decodes run at once in a process and hands freed memory back to the OS
  after a burst (glibc keeps freed heap pages otherwise: four 9400x9400 queries left a server at +3 GB).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from imsrc.config import Settings
from imsrc.errors import BusyError, InvalidInputError

# The documented formats, as Pillow names its decoders. MPO (multi-picture JPEG from cameras) is opened by
# the JPEG decoder itself, so allowing JPEG allows it. DIB (headerless BMP) is not on the list.
BASE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
OPTIONAL_FORMATS = ("HEIF", "AVIF")  # registered by pillow-heif / pillow-avif-plugin, or built into Pillow
JPEG_FAMILY = frozenset({"JPEG", "MPO"})

# The working image is reduced by the smallest whole factor that brings it to at most this many pixels, but
# its shorter side stays at MIN_SIDE or more: models see 224-448 px, thumbnails at most 1024 px, pHash 32 px.
# Images up to 8 MP are used as decoded.
WORK_PIXELS = 8_388_608
MIN_SIDE = 512
STRIP_PIXELS = 1 << 20  # pixels converted at a time
WORK_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(InvalidInputError):
    """The bytes are not an image we accept (empty, corrupt, another format, too many pixels)."""

    code = "not_an_image"


class UnsupportedFormatError(ImageDecodeError):
    """Content that is none of the accepted formats (keeps the code not_an_image: clients cannot and need
    not tell "a TGA" from "a text file")."""


class ImageTooLargeError(ImageDecodeError):
    code = "image_too_large"


@dataclass(frozen=True, slots=True)
class Decoded:
    image: Image.Image  # the working image: L, LA, RGB or RGBA, upright, possibly reduced
    width: int  # the original's size, upright
    height: int
    format: str  # Pillow's name for the content: JPEG, MPO, PNG, WEBP, GIF, BMP, TIFF, HEIF, AVIF


def allowed_formats() -> tuple[str, ...]:
    """Pillow decoder names accepted here (the optional ones only where a plugin or codec registered them)."""
    from imsrc.formats import image_extensions

    image_extensions()  # registers the HEIF/AVIF plugins that are installed
    Image.init()
    return BASE_FORMATS + tuple(f for f in OPTIONAL_FORMATS if f in Image.OPEN)


def format_names() -> str:
    names = {
        "JPEG": "JPEG",
        "PNG": "PNG",
        "WEBP": "WebP",
        "GIF": "GIF",
        "BMP": "BMP",
        "TIFF": "TIFF",
        "HEIF": "HEIC/HEIF",
        "AVIF": "AVIF",
    }
    listed = [names[f] for f in allowed_formats()]
    return ", ".join(listed[:-1]) + " or " + listed[-1]


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff(data: bytes) -> str | None:
    """The accepted format a file's first bytes claim, to tell 'corrupt PNG' from 'not an accepted format'."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def too_large(width: int, height: int, max_pixels: int, setting: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} ({setting})"
    )


def reduction_factor(width: int, height: int) -> int:
    factor = math.ceil(math.sqrt(width * height / WORK_PIXELS))
    return max(1, min(factor, min(width, height) // MIN_SIDE))


def decode(data: bytes, *, max_pixels: int, setting: str = "IMSRC_MAX_PIXELS") -> Decoded:
    """Decode the first frame of `data` into a bounded working image, or raise an ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=allowed_formats())
    except UnidentifiedImageError as exc:
        kind = sniff(data)
        if kind:
            raise ImageDecodeError(
                f"corrupt or truncated image data: starts like a {kind} file but cannot be decoded"
            ) from exc
        raise UnsupportedFormatError(f"not a recognised image format (content is not {format_names()})") from exc
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: it will not even open it
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{found.group(1)} pixels" if found else "too many pixels"
        raise ImageTooLargeError(f"image has {pixels}, over the limit of {max_pixels} ({setting})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image data: {str(exc).strip() or type(exc).__name__}") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise too_large(width, height, max_pixels, setting)
    fmt = img.format or "UNKNOWN"
    orientation = _orientation(img)
    factor = reduction_factor(width, height)
    try:
        if factor > 1 and fmt in JPEG_FAMILY:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly; the strips below do what is left.
            img.draft(None, (max(1, width // factor), max(1, height // factor)))
            factor = reduction_factor(*img.size)
        img.load()
        work = _to_working(img, factor)
    except MemoryError:
        raise
    except Exception as exc:  # the decoders raise many kinds for bad data; each means "cannot decode"
        raise ImageDecodeError(f"corrupt or truncated image data: {str(exc).strip() or type(exc).__name__}") from exc
    if orientation in _TRANSPOSE:
        work = work.transpose(_TRANSPOSE[orientation])
        if orientation >= 5:
            width, height = height, width
    return Decoded(image=work, width=width, height=height, format=fmt)


def _orientation(img: Image.Image) -> int:
    with contextlib.suppress(Exception):  # a malformed EXIF block should not cost the whole image
        value = img.getexif().get(_ORIENTATION_TAG)
        return int(value) if value else 1
    return 1


def _to_working(img: Image.Image, factor: int) -> Image.Image:
    """The loaded image in a working mode, reduced `factor` times. Converted a strip at a time, so besides
    the decoded pixels only one strip and the (small) result exist."""
    mode = _working_mode(img)
    if mode == img.mode and factor == 1:
        return img
    width, height = img.size
    convert = _strip_converter(img, mode)
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    step = max(factor, STRIP_PIXELS // max(1, width) // factor * factor)  # whole reduction blocks per strip
    for top in range(0, height, step):
        strip = convert(img.crop((0, top, width, min(height, top + step))))
        if factor > 1:
            strip = strip.reduce(factor)
        out.paste(strip, (0, top // factor))
    return out


def _working_mode(img: Image.Image) -> str:
    if img.mode in WORK_MODES:
        return img.mode
    if img.mode in ("PA", "La") or (img.mode == "P" and "transparency" in img.info):
        return "RGBA"
    if img.mode in ("1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return "L"
    return "RGB"


def _strip_converter(img: Image.Image, mode: str) -> Callable[[Image.Image], Image.Image]:
    if img.mode.startswith(("I", "F")):
        # High-bit-depth grey: scale the image's own maximum to 255 (Pillow's convert would clip at 255).
        high = img.getextrema()[1]
        top = float(high) if isinstance(high, int | float) and high > 0 else 1.0

        def scale(strip: Image.Image) -> Image.Image:
            arr = np.asarray(strip, dtype=np.float32)
            return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")

        return scale
    if img.mode == mode:
        return lambda strip: strip
    return lambda strip: strip.convert(mode)


def model_image(img: Image.Image) -> Image.Image:
    """RGB for models and hashing. Transparent areas go on white (their hidden colour is arbitrary).

    Queries and the catalog both go through this, so they see the same pixels."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def phash64(rgb: Image.Image) -> int:
    """The 64-bit perceptual hash of a model_image (first bit most significant, imagehash's order). Catalog
    images (ingest) and search queries are hashed here, so a copy of an indexed image hashes like it."""
    import imagehash  # loads scipy; only paths that hash pay for it

    return int(str(imagehash.phash(rgb, hash_size=8)), 16)


# ------------------------------------------------------------------ bounding concurrent decodes
def _load_malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): return free heap pages (in every arena) to the OS. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


malloc_trim = _load_malloc_trim()


class DecodeGate:
    """At most `limit` decodes at once in this process; a caller that cannot start within `wait_s` gets
    BusyError (503 + Retry-After). When the last decode of a burst ends, freed memory goes back to the OS.

    Created once per process or app (app lifespan, SearchRuntime) and passed to whatever decodes."""

    def __init__(self, limit: int, wait_s: float, *, trim: Callable[[], None] = malloc_trim) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._active = 0
        self._trim = trim

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeGate:
        return cls(settings.max_concurrent_decodes, settings.decode_wait_s)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise BusyError(
                f"{self.limit} images are being decoded already; retry shortly (IMSRC_MAX_CONCURRENT_DECODES)",
                retry_after=max(1, math.ceil(self.wait_s)),
            )
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                idle = self._active == 0
            self._slots.release()
            if idle:
                self._trim()
