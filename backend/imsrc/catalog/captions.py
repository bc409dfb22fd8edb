"""Captions: one short text per image, searchable by keywords (PostgreSQL full text, migration 0009).

Four routes write them (the upload form, sidecar files at index time, `imsrc captions import FILE`, and
PATCH /api/images/{id}); all go through clean_caption, so the same text is refused the same way everywhere.
The SQL lives in CaptionRepository; nothing here commits.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.errors import InvalidInputError, NotFoundError

# Also a CHECK on images.caption (migration 0009): change both together.
MAX_CAPTION_CHARS = 2000


def clean_caption(value: str | None, *, where: str = "caption") -> str | None:
    """The caption as stored: surrounding whitespace dropped, blank means none. NUL bytes (PostgreSQL text
    cannot hold them) and captions over MAX_CAPTION_CHARS are refused, never silently cut."""
    if value is None:
        return None
    if "\x00" in value:
        raise InvalidInputError(f"{where}: contains a NUL byte")
    if not value.isascii():
        try:  # a lone surrogate (a JSON "\ud800", argv bytes that are not UTF-8) fails in the driver otherwise
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{where}: not valid Unicode (a lone surrogate at {exc.start})") from exc
    cleaned = value.strip()
    if len(cleaned) > MAX_CAPTION_CHARS:
        raise InvalidInputError(f"{where}: {len(cleaned)} characters, at most {MAX_CAPTION_CHARS}")
    return cleaned or None


class CaptionRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def set_caption(self, image_id: int, caption: str | None) -> None:
        found = self.session.execute(
            text("UPDATE images SET caption = :c WHERE id = :i RETURNING id"), {"c": caption, "i": image_id}
        ).first()
        if found is None:
            raise NotFoundError(f"image {image_id} does not exist")
        self.session.expire_all()

    def set_many(self, captions: Sequence[tuple[int, str | None]]) -> int:
        """(image id, caption) pairs; returns how many images changed."""
        if not captions:
            return 0
        ids = [i for i, _ in captions]
        values = [c for _, c in captions]
        result = self.session.execute(
            text(
                "UPDATE images i SET caption = u.c FROM unnest(CAST(:ids AS bigint[]), CAST(:cs AS text[])) u(id, c)"
                " WHERE i.id = u.id AND i.caption IS DISTINCT FROM u.c"
            ),
            {"ids": ids, "cs": values},
        )
        self.session.expire_all()
        return int(getattr(result, "rowcount", 0) or 0)

    def set_where_missing(self, image_ids: Sequence[int], caption: str) -> None:
        """An upload's caption for images that have none yet (a re-uploaded copy keeps its own)."""
        if image_ids:
            self.session.execute(
                text("UPDATE images SET caption = :c WHERE id = ANY(:ids) AND caption IS NULL"),
                {"c": caption, "ids": list(image_ids)},
            )
            self.session.expire_all()

    def existing_ids(self, image_ids: Sequence[int]) -> set[int]:
        rows = self.session.execute(text("SELECT id FROM images WHERE id = ANY(:ids)"), {"ids": list(image_ids)})
        return {int(r[0]) for r in rows}

    def ids_by_sha256(self, digests: Sequence[bytes]) -> dict[bytes, int]:
        rows = self.session.execute(
            text("SELECT sha256, min(id) FROM images WHERE sha256 = ANY(:d) GROUP BY 1"), {"d": list(digests)}
        )
        return {bytes(r[0]): int(r[1]) for r in rows}

    def ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        """Indexed files by path (every path the indexer saw holding an image's bytes, and referenced paths)."""
        rows = self.session.execute(
            text(
                "SELECT path, image_id FROM image_sources WHERE path = ANY(:p)"
                " UNION SELECT source_path, id FROM images WHERE source_path = ANY(:p)"
            ),
            {"p": list(paths)},
        )
        return {str(r[0]): int(r[1]) for r in rows}
