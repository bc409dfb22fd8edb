"""/api/categories: list with counts and samples, create, rename/describe, detail with prototype info."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from imsrc.api.deps import RuntimeDep, SessionDep, SettingsDep
from imsrc.catalog.schemas import CategoryCreate, CategoryDetail, CategorySummary, CategoryUpdate
from imsrc.services.categories import CategoryService

router = APIRouter(prefix="/api/categories", tags=["categories"])

CategoryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="category id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such category (error JSON)"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": "another category has that name (error JSON)"}}


@router.get("", response_model=list[CategorySummary], summary="Categories with counts and sample thumbnails")
def list_categories(session: SessionDep) -> list[CategorySummary]:
    return CategoryService(session).list()


@router.post("", response_model=CategorySummary, status_code=201, responses=CONFLICT, summary="Create a named category")
def create_category(
    body: CategoryCreate, session: SessionDep, settings: SettingsDep, runtime: RuntimeDep
) -> CategorySummary:
    return CategoryService(session, settings, runtime.embedder_factory).create(body)


@router.get(
    "/{category_id}",
    response_model=CategoryDetail,
    responses=NOT_FOUND,
    summary="One category with its prototypes per model",
)
def get_category(category_id: CategoryId, session: SessionDep) -> CategoryDetail:
    return CategoryService(session).detail(category_id)


@router.patch(
    "/{category_id}",
    response_model=CategorySummary,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Rename or describe a category (renaming an automatic one makes it a named one)",
)
def update_category(
    category_id: CategoryId, body: CategoryUpdate, session: SessionDep, settings: SettingsDep, runtime: RuntimeDep
) -> CategorySummary:
    # A plain `def` route: FastAPI runs it in the threadpool, so a text encoding after a rename stays off the loop.
    return CategoryService(session, settings, runtime.embedder_factory).update(category_id, body)
