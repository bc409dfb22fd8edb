"""Opening a referenced original (an image indexed with --store reference) without trusting the path.

The catalog holds a path, but what is at that path now is outside its control: the file can be replaced by a
symbolic link to /etc/..., by an HTML page, or the folder above it by a link elsewhere. So a file is served only
when, at the moment it is opened:
- its real path (links resolved) lies inside a folder (or is a file) that an indexing job was given;
- the final open does not follow a link (O_NOFOLLOW) and finds a regular file;
- its size and SHA-256 equal the catalog's: the bytes served are the bytes that were indexed.
The open file itself is what gets served, so nothing can be swapped between the check and the read.
Error messages name the image, never a path: they reach API clients that may not see paths.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from imsrc.errors import ConflictError, NotFoundError

CHUNK = 1 << 20
_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


@dataclass
class OpenedFile:
    file: BinaryIO
    size: int

    def chunks(self) -> Iterator[bytes]:
        """The bytes, a chunk at a time; closes the file when done (or when the consumer stops early)."""
        try:
            while chunk := self.file.read(CHUNK):
                yield chunk
        finally:
            self.file.close()


def within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_verified(path: str, roots: Iterable[str], *, byte_size: int, sha256: bytes, image_id: int) -> OpenedFile:
    """The referenced file, opened and checked as described above; NotFoundError (404) when it is gone or has
    left the indexed folders, ConflictError (409) when its content is no longer what was indexed."""
    real = os.path.realpath(path)
    if not any(within(real, os.path.realpath(root)) for root in roots):
        if not os.path.lexists(path):
            raise NotFoundError(f"image {image_id}'s file is no longer there")
        raise NotFoundError(f"image {image_id}'s file is no longer inside an indexed folder")
    try:
        fd = os.open(real, _FLAGS)
    except FileNotFoundError as exc:
        raise NotFoundError(f"image {image_id}'s file is no longer there") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link after the path was resolved
            raise NotFoundError(f"image {image_id}'s file is no longer inside an indexed folder") from exc
        raise NotFoundError(f"image {image_id}'s file cannot be opened") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"image {image_id}'s file is no longer a regular file")
        changed = ConflictError(f"image {image_id}'s file has changed since it was indexed; index its folder again")
        if st.st_size != byte_size:
            raise changed
        digest = hashlib.sha256()
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
        if digest.digest() != bytes(sha256):
            raise changed
        os.lseek(fd, 0, os.SEEK_SET)
        return OpenedFile(os.fdopen(fd, "rb"), st.st_size)
    except BaseException:
        os.close(fd)
        raise
