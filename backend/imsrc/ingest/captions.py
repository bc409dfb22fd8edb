"""Captions from files: sidecars next to indexed images (`imsrc index`), and a CSV import (`imsrc captions import`).

Sidecars: for `photo.jpg`, the first of `photo.jpg.txt`, `photo.jpg.json`, `photo.txt`, `photo.json` that exists.
A .txt holds the caption itself; a .json is {"caption": "..."} (or a JSON string). They are read after the
indexing job, for every image file under the roots (unchanged ones too), so editing a sidecar and indexing
again updates the caption. A sidecar that cannot be used (too long, NUL bytes, bad JSON, not UTF-8) is
reported and skipped; it never fails the image.

CSV: a header row with `caption` and one of `id`, `sha256` (hex) or `path` (as indexed). Every row is checked
before anything is written: one bad row (unknown image, bad caption) fails the import, naming its line.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from imsrc.catalog.captions import MAX_CAPTION_CHARS, CaptionRepository, clean_caption
from imsrc.db.session import Database
from imsrc.errors import InvalidInputError, NotFoundError
from imsrc.ingest.scan import scan

# More than a caption can hold in any encoding; a bigger sidecar is refused without reading it whole.
MAX_SIDECAR_BYTES = 4 * MAX_CAPTION_CHARS + 1024
LOOKUP_CHUNK = 1000
KEYS = ("id", "sha256", "path")


@dataclass
class SidecarReport:
    captions: int = 0  # images whose caption was set or changed
    sidecars: int = 0  # sidecar files found for indexed images
    problems: list[tuple[str, str]] = field(default_factory=list)  # (sidecar path, why it was skipped)

    def as_dict(self) -> dict[str, object]:
        return {
            "captions": self.captions,
            "sidecars": self.sidecars,
            "problems": [{"path": p, "reason": r} for p, r in self.problems],
        }


def sidecar_for(image_path: str) -> str | None:
    stem = os.path.splitext(image_path)[0]
    for candidate in (image_path + ".txt", image_path + ".json", stem + ".txt", stem + ".json"):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_sidecar(path: str) -> str | None:
    """The caption a sidecar holds (None when it is blank); InvalidInputError says why it cannot be used."""
    with open(path, "rb") as f:
        raw = f.read(MAX_SIDECAR_BYTES + 1)
    if len(raw) > MAX_SIDECAR_BYTES:
        raise InvalidInputError(
            f"over {MAX_SIDECAR_BYTES} bytes (a caption holds at most {MAX_CAPTION_CHARS} characters)"
        )
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError("not UTF-8 text") from exc
    if path.endswith(".json"):
        try:
            value = json.loads(content)
        except ValueError as exc:
            raise InvalidInputError(f"not valid JSON ({exc.args[0] if exc.args else exc})") from exc
        if isinstance(value, dict):
            value = value.get("caption")
        if value is not None and not isinstance(value, str):
            raise InvalidInputError('expected {"caption": "..."} or a JSON string')
        content = value or ""
    return clean_caption(content, where="caption")


def apply_sidecars(database: Database, roots: Sequence[str]) -> SidecarReport:
    """Captions from the sidecars of every indexed image under roots. One unit of work (commits once)."""
    report = SidecarReport()
    found: dict[str, str | None] = {}
    for item in scan(roots):
        if item.fail_reason is not None or item.path is None:
            continue
        sidecar = sidecar_for(item.path)
        if sidecar is None:
            continue
        try:
            found[item.key] = read_sidecar(sidecar)
        except (OSError, InvalidInputError) as exc:
            report.problems.append((sidecar, getattr(exc, "message", None) or str(exc)))
    if not found:
        return report
    with database.session() as session:
        captions = CaptionRepository(session)
        pairs: list[tuple[int, str | None]] = []
        for chunk in _chunks(list(found), LOOKUP_CHUNK):
            ids = captions.ids_by_path(chunk)
            pairs += [(ids[key], found[key]) for key in chunk if key in ids]
        report.sidecars = len(pairs)
        report.captions = captions.set_many(_last_per_image(pairs))
    return report


@dataclass
class ImportReport:
    rows: int
    changed: int

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "changed": self.changed}


def import_csv(session: Session, path: Path) -> ImportReport:
    """Set captions from a CSV file (see the module doc). Never commits; all rows or none."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    except OSError as exc:
        raise NotFoundError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
    if not rows:
        raise InvalidInputError(f"{path}: no rows (expected a header with caption and one of id, sha256, path)")
    key = next((k for k in KEYS if k in header), None)
    if "caption" not in header or key is None:
        raise InvalidInputError(
            f"{path}: the header needs a caption column and one of id, sha256, path (found: {', '.join(header)})"
        )
    entries = list(_entries(rows, key))
    captions = CaptionRepository(session)
    ids = _resolve(captions, key, [e[1] for e in entries])
    pairs: list[tuple[int, str | None]] = []
    for line, value, caption in entries:
        if value not in ids:
            raise InvalidInputError(f"line {line}: no image with {key} {value}")
        pairs.append((ids[value], caption))
    return ImportReport(rows=len(pairs), changed=captions.set_many(_last_per_image(pairs)))


def _entries(rows: list[dict[str | None, str | None]], key: str) -> Iterator[tuple[int, str, str | None]]:
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row:
            raise InvalidInputError(f"line {n}: more fields than the header names (quote captions with commas)")
        clean = {(k or "").strip().lower(): v for k, v in row.items()}
        value = (clean.get(key) or "").strip()
        if not value:
            raise InvalidInputError(f"line {n}: the {key} is empty")
        if key == "id" and not _is_id(value):
            raise InvalidInputError(f"line {n}: id must be a positive integer, not {value[:40]!r}")
        if key == "sha256" and not _is_sha256(value):
            raise InvalidInputError(f"line {n}: sha256 must be 64 hex digits")
        yield (
            n,
            # ids as the look-up keys them (str(int): '007' is image 7), digests in lower case
            str(int(value)) if key == "id" else value.lower() if key == "sha256" else value,
            clean_caption(clean.get("caption"), where=f"line {n}: caption"),
        )


def _resolve(captions: CaptionRepository, key: str, values: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(sorted(set(values)), LOOKUP_CHUNK):
        if key == "id":
            found |= {str(i): i for i in captions.existing_ids([int(v) for v in chunk])}
        elif key == "sha256":
            found |= {d.hex(): i for d, i in captions.ids_by_sha256([bytes.fromhex(v) for v in chunk]).items()}
        else:
            found |= captions.ids_by_path([os.path.abspath(v) for v in chunk] + chunk)
            found |= {v: found[os.path.abspath(v)] for v in chunk if os.path.abspath(v) in found}
    return found


def _is_id(value: str) -> bool:
    # isdigit() alone also accepts '²' (int() fails) and other scripts' digits; 19 digits bound int()'s work.
    return value.isascii() and value.isdigit() and len(value) <= 19 and 0 < int(value) < 2**63


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def _last_per_image(pairs: list[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
    """One caption per image (the last given wins: two paths with the same bytes are one image)."""
    return list(dict(pairs).items())


def _chunks(values: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
