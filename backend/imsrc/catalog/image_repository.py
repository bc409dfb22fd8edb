"""SQL for reading and deleting catalogued images. Takes a Session, never commits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, aliased

from imsrc.catalog.models import Category, Image, ImageBlob, Thumbnail
from imsrc.errors import NotFoundError

DuplicateFilter = Literal["include", "exclude", "only"]


@dataclass(frozen=True)
class DeleteOutcome:
    image_id: int
    category_id: int | None
    new_canonical_id: int | None
    repointed: int


class ImageRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, image_id: int) -> Image:
        image = self.session.get(Image, image_id)
        if image is None:
            raise NotFoundError(f"image {image_id} does not exist")
        return image

    def page(
        self, *, category_id: int | None, duplicates: DuplicateFilter, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest first. Returns the rows of one page and the total matching the filters."""
        conditions = []
        if category_id is not None:
            conditions.append(Image.category_id == category_id)
        if duplicates == "exclude":
            conditions.append(Image.canonical_id.is_(None))
        elif duplicates == "only":
            conditions.append(Image.canonical_id.is_not(None))
        total = self.session.scalar(select(func.count()).select_from(Image).where(*conditions)) or 0
        dup = aliased(Image)
        dup_count = select(func.count()).select_from(dup).where(dup.canonical_id == Image.id).scalar_subquery()
        stmt = (
            select(Image, Category.name.label("category_name"), dup_count.label("duplicate_count"))
            .outerjoin(Category, Category.id == Image.category_id)
            .where(*conditions)
            .order_by(Image.id.desc())
            .offset(offset)
            .limit(limit)
        )
        rows = [
            {"image": r.Image, "category_name": r.category_name, "duplicate_count": int(r.duplicate_count)}
            for r in self.session.execute(stmt)
        ]
        return rows, int(total)

    def category_name(self, category_id: int | None) -> str | None:
        if category_id is None:
            return None
        return self.session.scalar(select(Category.name).where(Category.id == category_id))

    def duplicates_of(self, image_id: int) -> list[Image]:
        stmt = select(Image).where(Image.canonical_id == image_id).order_by(Image.id)
        return list(self.session.scalars(stmt))

    def model_names(self, image_id: int) -> list[str]:
        rows = self.session.execute(
            text(
                "SELECT m.name FROM embeddings e JOIN embedding_models m ON m.id = e.model_id "
                "WHERE e.image_id = :i ORDER BY m.name"
            ),
            {"i": image_id},
        )
        return [str(r[0]) for r in rows]

    def has_blob(self, image_id: int) -> bool:
        return self.session.scalar(select(func.count()).where(ImageBlob.image_id == image_id)) == 1

    def blob(self, image_id: int) -> bytes | None:
        return self.session.scalar(select(ImageBlob.data).where(ImageBlob.image_id == image_id))

    def source_paths(self, image: Image) -> list[str]:
        """Where the image's bytes can be read: its own path first, then every other path found with them."""
        rows = self.session.execute(
            text("SELECT path FROM image_sources WHERE image_id = :i ORDER BY id"), {"i": image.id}
        ).scalars()
        paths = [image.source_path] if image.source_path else []
        return paths + [str(p) for p in rows if p not in paths]

    def indexed_roots(self) -> list[str]:
        """Every folder or file an indexing job was given: referenced files are served only from inside them."""
        return [
            str(p)
            for p in self.session.execute(
                text("SELECT DISTINCT unnest(paths) FROM ingest_jobs WHERE kind = 'index'")
            ).scalars()
        ]

    def thumbnail(self, image_id: int) -> tuple[bytes, str, str] | None:
        """(webp bytes, mime type, sha256 hex of the image) or None when there is no thumbnail."""
        row = self.session.execute(
            select(Thumbnail.data, Thumbnail.mime_type, func.encode(Image.sha256, "hex"))
            .join(Image, Image.id == Thumbnail.image_id)
            .where(Thumbnail.image_id == image_id)
        ).first()
        return None if row is None else (bytes(row[0]), str(row[1]), str(row[2]))

    def delete(self, image_id: int) -> DeleteOutcome:
        """Delete one image (blob, thumbnail and vectors go by cascade); its duplicates get a new canonical.

        The oldest duplicate becomes canonical so the group survives; the FK's ON DELETE SET NULL alone
        would silently split the group into unrelated images.
        """
        row = self.session.execute(
            text("SELECT id, category_id FROM images WHERE id = :i FOR UPDATE"), {"i": image_id}
        ).first()
        if row is None:
            raise NotFoundError(f"image {image_id} does not exist")
        dups = [
            int(r[0])
            for r in self.session.execute(
                text("SELECT id FROM images WHERE canonical_id = :i ORDER BY id FOR UPDATE"), {"i": image_id}
            )
        ]
        new_canonical = dups[0] if dups else None
        if new_canonical is not None:
            self.session.execute(text("UPDATE images SET canonical_id = NULL WHERE id = :n"), {"n": new_canonical})
            self.session.execute(
                text("UPDATE images SET canonical_id = :n WHERE canonical_id = :i"),
                {"n": new_canonical, "i": image_id},
            )
        self.session.execute(text("DELETE FROM images WHERE id = :i"), {"i": image_id})
        self.session.expire_all()
        return DeleteOutcome(
            image_id=image_id, category_id=row[1], new_canonical_id=new_canonical, repointed=max(0, len(dups) - 1)
        )

    def sample_thumbnails(self, category_ids: list[int], per_category: int) -> dict[int, list[int]]:
        """Up to `per_category` canonical image ids with thumbnails per category, newest first."""
        if not category_ids:
            return {}
        rows = self.session.execute(
            text(
                "SELECT c.id AS category_id, s.id FROM unnest(CAST(:ids AS bigint[])) AS c(id) "
                "CROSS JOIN LATERAL (SELECT i.id FROM images i JOIN thumbnails t ON t.image_id = i.id "
                "  WHERE i.category_id = c.id AND i.canonical_id IS NULL ORDER BY i.id DESC LIMIT :n) s"
            ),
            {"ids": category_ids, "n": per_category},
        )
        out: dict[int, list[int]] = {}
        for category_id, image_id in rows:
            out.setdefault(int(category_id), []).append(int(image_id))
        return out
