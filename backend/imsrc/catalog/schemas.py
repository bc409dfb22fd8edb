"""API schemas for images and categories (separate from the ORM classes on purpose)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator


def image_file_url(image_id: int) -> str:
    return f"/api/images/{int(image_id)}/file"


def image_thumbnail_url(image_id: int) -> str:
    return f"/api/images/{int(image_id)}/thumbnail"


class CategoryRef(BaseModel):
    id: int
    name: str


class ImageSummary(BaseModel):
    """One image in a list: enough to draw a card."""

    id: int
    original_name: str | None
    width: int
    height: int
    format: str
    byte_size: int
    category: CategoryRef | None
    canonical_id: int | None = Field(description="set when this image is a near-duplicate of another")
    duplicate_count: int = Field(description="how many images are near-duplicates of this one")
    created_at: datetime
    thumbnail_url: str
    file_url: str


class ImagePage(BaseModel):
    items: list[ImageSummary]
    total: int
    page: int
    page_size: int
    pages: int


class DuplicateRef(BaseModel):
    id: int
    original_name: str | None
    thumbnail_url: str
    file_url: str


class ImageDetail(BaseModel):
    id: int
    sha256: str
    phash: str | None
    original_name: str | None
    source_path: str | None = Field(description="the referenced file for images indexed with --store reference")
    stored_in_database: bool
    width: int
    height: int
    format: str
    byte_size: int
    caption: str | None
    category: CategoryRef | None
    predicted_category: CategoryRef | None
    predicted_score: float | None
    canonical: DuplicateRef | None = Field(description="the image this one duplicates, if any")
    duplicates: list[DuplicateRef] = Field(description="images recorded as near-duplicates of this one")
    models: list[str] = Field(description="embedding models that have a vector for this image")
    created_at: datetime
    thumbnail_url: str
    file_url: str


class ImageUpdate(BaseModel):
    """PATCH /api/images/{id}: the fields given change; `caption: null` or blank removes the caption."""

    caption: str | None = Field(
        default=None, description="at most 2000 characters, no NUL bytes; searchable by keywords (left out: unchanged)"
    )


class DeletedImage(BaseModel):
    id: int
    new_canonical_id: int | None = Field(description="the duplicate promoted to canonical, if any")
    repointed: int = Field(description="duplicates now pointing at the new canonical")


UploadStatus = Literal["new", "duplicate", "failed"]


class UploadResult(BaseModel):
    filename: str | None
    status: UploadStatus
    id: int | None = Field(default=None, description="the new image (status new or duplicate)")
    duplicate_of: int | None = Field(default=None, description="the existing image this one duplicates")
    exact: bool | None = Field(default=None, description="for duplicates: identical bytes (else near-duplicate)")
    reason: str | None = Field(default=None, description="why the file failed")
    category: CategoryRef | None = None
    thumbnail_url: str | None = None


class UploadResponse(BaseModel):
    results: list[UploadResult]
    new: int
    duplicates: int
    failed: int


def _clean_name(value: str) -> str:
    cleaned = " ".join(value.split())
    if not cleaned:
        raise ValueError("must not be blank")
    return cleaned


class CategoryCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)

    @field_validator("name")
    @classmethod
    def _name_clean(cls, value: str) -> str:
        return _clean_name(value)


class CategoryUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)

    @field_validator("name")
    @classmethod
    def _name_clean(cls, value: str | None) -> str | None:
        return None if value is None else _clean_name(value)


class CategorySummary(BaseModel):
    id: int
    name: str
    description: str | None
    is_automatic: bool = Field(description="made by clustering, not named by a person")
    image_count: int
    unique_image_count: int = Field(description="images that are not near-duplicates of another")
    prototype_count: int
    sample_thumbnail_urls: list[str]
    created_at: datetime


class PrototypeInfo(BaseModel):
    model: str
    kind: str = Field(description="mean, cluster or text")
    count: int = Field(description="how many prototype vectors of this kind")
    member_count: int = Field(description="images the prototypes were computed from")
    updated_at: datetime


class CategoryDetail(CategorySummary):
    prototypes: list[PrototypeInfo]
