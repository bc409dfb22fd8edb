"""A streaming multipart/form-data reader for uploads.

Starlette's form parser keeps going until the whole body is in (spooled to disk past 1 MB) and only then lets us
look at sizes. This reader writes each file part straight to its own temporary file and stops reading the moment
one file passes the size limit, so a too-large upload costs neither memory nor a full disk write.
"""

from __future__ import annotations

import codecs
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.multipart import MultipartParser, parse_options_header

from imsrc.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 100


@dataclass
class UploadedFile:
    filename: str | None
    path: Path
    size: int
    content_type: str | None


@dataclass
class ParsedForm:
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    handle: IO[bytes] | None = None
    path: Path | None = None
    size: int = 0


class _Collector:
    """python-multipart callbacks. They run inside parser.write(); an error is kept and raised after it."""

    def __init__(self, directory: Path, *, file_field: str, max_file_bytes: int, max_files: int, charset: str) -> None:
        self.directory = directory
        self.file_field = file_field
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.charset = charset
        self.form = ParsedForm()
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.error: Exception | None = None

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        self.part.name = options.get(b"name", b"").decode(self.charset, "replace")
        if b"filename" not in options:
            return
        if self.part.name != self.file_field:
            self._fail(InvalidInputError(f"files go in the {self.file_field!r} field, not {self.part.name!r}"))
            return
        if len(self.form.files) >= self.max_files:
            self._fail(PayloadTooLargeError(f"at most {self.max_files} files per upload"))
            return
        raw_name = options[b"filename"].decode(self.charset, "replace").replace("\\", "/")
        # Only the base name, without control characters (NUL cannot even be stored in PostgreSQL text).
        clean = "".join(ch for ch in Path(raw_name).name if ch.isprintable()).strip()
        self.part.filename = clean if clean not in ("", ".", "..") else None
        ctype = self.part.headers.get(b"content-type")
        self.part.content_type = ctype.decode("latin-1") if ctype else None
        fd, name = tempfile.mkstemp(dir=self.directory, prefix="upload-")
        self.part.path = Path(name)
        self.part.handle = open(fd, "wb")  # noqa: SIM115 - closed in on_part_end / close()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        chunk = data[start:end]
        if self.part.handle is not None:
            self.part.size += len(chunk)
            if self.part.size > self.max_file_bytes:
                self._fail(
                    PayloadTooLargeError(
                        f"{self.part.filename or 'a file'} is larger than the upload limit of "
                        f"{self.max_file_bytes} bytes (IMSRC_MAX_UPLOAD_BYTES)"
                    )
                )
                return
            self.part.handle.write(chunk)
        elif self.part.filename is None:
            if len(self.part.data) + len(chunk) > MAX_FIELD_BYTES:
                self._fail(PayloadTooLargeError(f"form field {self.part.name!r} is too long"))
                return
            self.part.data.extend(chunk)

    def on_part_end(self) -> None:
        if self.error is not None:
            return
        part = self.part
        if part.handle is not None and part.path is not None:
            part.handle.close()
            part.handle = None
            self.form.files.append(UploadedFile(part.filename, part.path, part.size, part.content_type))
        elif part.filename is None and part.name:
            if len(self.form.fields) >= MAX_FIELDS:
                self._fail(InvalidInputError("too many form fields"))
                return
            self.form.fields[part.name] = part.data.decode(self.charset, "replace")

    def close(self) -> None:
        if self.part.handle is not None:
            self.part.handle.close()

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }


async def read_multipart(
    content_type: str | None,
    stream: AsyncIterator[bytes],
    directory: Path,
    *,
    file_field: str,
    max_file_bytes: int,
    max_files: int,
) -> ParsedForm:
    """Read a multipart body into temporary files under `directory` (the caller removes it)."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise UnsupportedMediaTypeError("send the files as multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInputError("multipart body without a boundary")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "utf-8"
    collector = _Collector(
        directory, file_field=file_field, max_file_bytes=max_file_bytes, max_files=max_files, charset=charset
    )
    try:
        # Inside the try: the parser itself refuses some boundaries (over 256 bytes) with a ValueError.
        parser = MultipartParser(boundary, collector.callbacks())
        async for chunk in stream:
            parser.write(chunk)
            if collector.error is not None:
                raise collector.error
        parser.finalize()
        if collector.error is not None:
            raise collector.error
    except ValueError as exc:  # python-multipart's MultipartParseError is a ValueError
        raise InvalidInputError(f"malformed multipart body: {exc}") from exc
    finally:
        collector.close()
    return collector.form
