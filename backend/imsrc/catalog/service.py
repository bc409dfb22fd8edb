"""Images in the catalog: list, detail, original file, thumbnail (deleting is in services/images.py).
Never commits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy.orm import Session

from imsrc.catalog.captions import CaptionRepository, clean_caption
from imsrc.catalog.image_repository import DuplicateFilter, ImageRepository
from imsrc.catalog.models import Image
from imsrc.catalog.referenced import OpenedFile, open_verified
from imsrc.catalog.repository import CategoryRepository
from imsrc.catalog.schemas import (
    CategoryRef,
    DuplicateRef,
    ImageDetail,
    ImagePage,
    ImageSummary,
    ImageUpdate,
    image_file_url,
    image_thumbnail_url,
)
from imsrc.errors import ConflictError, ImsrcError, NotFoundError


@dataclass(frozen=True)
class ImageFile:
    """The original: bytes stored in the database, or a referenced file, already opened and verified."""

    media_type: str
    filename: str
    data: bytes | None = None
    opened: OpenedFile | None = None


def media_type(fmt: str) -> str:
    return PILImage.MIME.get(fmt.upper(), "application/octet-stream")


def _ref(category_id: int | None, name: str | None) -> CategoryRef | None:
    return CategoryRef(id=category_id, name=name) if category_id is not None and name is not None else None


def _dup_ref(image: Image) -> DuplicateRef:
    return DuplicateRef(
        id=image.id,
        original_name=image.original_name,
        thumbnail_url=image_thumbnail_url(image.id),
        file_url=image_file_url(image.id),
    )


class ImageService:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.images = ImageRepository(session)
        self.categories = CategoryRepository(session)

    def resolve_category_id(self, category_id: int | None, category: str | None) -> int | None:
        if category_id is not None:
            self.categories.get(category_id)
            return category_id
        if category is None:
            return None
        found = self.categories.by_name(category)
        if found is None:
            raise NotFoundError(f"category {category!r} does not exist")
        return found.id

    def list_images(
        self, *, category_id: int | None, category: str | None, duplicates: DuplicateFilter, page: int, page_size: int
    ) -> ImagePage:
        cid = self.resolve_category_id(category_id, category)
        rows, total = self.images.page(
            category_id=cid, duplicates=duplicates, offset=(page - 1) * page_size, limit=page_size
        )
        items = [
            ImageSummary(
                id=r["image"].id,
                original_name=r["image"].original_name,
                width=r["image"].width,
                height=r["image"].height,
                format=r["image"].format,
                byte_size=r["image"].byte_size,
                category=_ref(r["image"].category_id, r["category_name"]),
                canonical_id=r["image"].canonical_id,
                duplicate_count=r["duplicate_count"],
                created_at=r["image"].created_at,
                thumbnail_url=image_thumbnail_url(r["image"].id),
                file_url=image_file_url(r["image"].id),
            )
            for r in rows
        ]
        return ImagePage(
            items=items, total=total, page=page, page_size=page_size, pages=max(1, math.ceil(total / page_size))
        )

    def detail(self, image_id: int) -> ImageDetail:
        image = self.images.get(image_id)
        canonical = self.images.get(image.canonical_id) if image.canonical_id is not None else None
        return ImageDetail(
            id=image.id,
            sha256=bytes(image.sha256).hex(),
            phash=_phash_hex(image.phash),
            original_name=image.original_name,
            source_path=image.source_path,
            stored_in_database=self.images.has_blob(image.id),
            width=image.width,
            height=image.height,
            format=image.format,
            byte_size=image.byte_size,
            caption=image.caption,
            category=_ref(image.category_id, self.images.category_name(image.category_id)),
            predicted_category=_ref(
                image.predicted_category_id, self.images.category_name(image.predicted_category_id)
            ),
            predicted_score=image.predicted_score,
            canonical=_dup_ref(canonical) if canonical is not None else None,
            duplicates=[_dup_ref(d) for d in self.images.duplicates_of(image.id)],
            models=self.images.model_names(image.id),
            created_at=image.created_at,
            thumbnail_url=image_thumbnail_url(image.id),
            file_url=image_file_url(image.id),
        )

    def update(self, image_id: int, body: ImageUpdate) -> ImageDetail:
        if "caption" in body.model_fields_set:
            CaptionRepository(self.session).set_caption(image_id, clean_caption(body.caption))
        return self.detail(image_id)

    def original(self, image_id: int) -> ImageFile:
        """Only ever an image the catalog knows: the id picks the row, the row picks the bytes or path."""
        image = self.images.get(image_id)
        ext = (image.format or "bin").lower().replace("jpeg", "jpg")
        filename = Path(image.original_name).name if image.original_name else f"image-{image.id}.{ext}"
        data = self.images.blob(image.id)
        if data is not None:
            return ImageFile(media_type=media_type(image.format), filename=filename, data=bytes(data))
        paths = self.images.source_paths(image)
        if not paths:
            raise NotFoundError(f"image {image_id} has neither stored bytes nor a file reference")
        roots = self.images.indexed_roots()
        first: ImsrcError | None = None
        for path in paths:  # identical bytes may also live at other indexed paths
            try:
                opened = open_verified(path, roots, byte_size=image.byte_size, sha256=image.sha256, image_id=image_id)
            except (NotFoundError, ConflictError) as exc:
                first = first or exc
                continue
            return ImageFile(media_type=media_type(image.format), filename=filename, opened=opened)
        assert first is not None
        raise first

    def thumbnail(self, image_id: int) -> tuple[bytes, str, str]:
        found = self.images.thumbnail(image_id)
        if found is None:
            self.images.get(image_id)  # 404 for a missing image, else a clearer message below
            raise NotFoundError(f"image {image_id} has no thumbnail")
        return found


def _phash_hex(phash: str | None) -> str | None:
    if phash is None:
        return None
    bits = str(phash)
    return f"{int(bits, 2):016x}" if bits and set(bits) <= {"0", "1"} else bits
