"""/api/categories: list with counts and samples, create, rename, detail with prototypes, errors."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from imsrc.catalog.repository import CategoryRepository, ModelRepository
from imsrc.search.prototypes import TEXT_PROMPT
from tests.fixtures.api import add_image


def test_list_counts_and_samples(client: TestClient, session: Session) -> None:
    cat = CategoryRepository(session).get_or_create("Listed")
    a = add_image(session, 101, category_id=cat.id)
    b = add_image(session, 102, category_id=cat.id, canonical_id=a.id)
    c = add_image(session, 103, category_id=cat.id)
    body = {x["name"]: x for x in client.get("/api/categories").json()}
    listed = body["Listed"]
    assert listed["image_count"] == 3 and listed["unique_image_count"] == 2
    # samples: canonical images only, newest first
    assert listed["sample_thumbnail_urls"] == [f"/api/images/{c.id}/thumbnail", f"/api/images/{a.id}/thumbnail"]
    assert f"/api/images/{b.id}/thumbnail" not in listed["sample_thumbnail_urls"]


def test_create_and_conflict(client: TestClient) -> None:
    created = client.post("/api/categories", json={"name": "  Red   Cars ", "description": "fast ones"})
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "Red Cars" and body["description"] == "fast ones" and body["is_automatic"] is False
    assert body["image_count"] == 0 and body["sample_thumbnail_urls"] == []
    clash = client.post("/api/categories", json={"name": "red cars"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "conflict"
    for bad in ({"name": ""}, {"name": "   "}, {}, {"name": "x" * 201}, {"name": 5}):
        response = client.post("/api/categories", json=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_input"


def test_rename_automatic_makes_it_real_and_duplicate_name_conflicts(client: TestClient, session: Session) -> None:
    repo = CategoryRepository(session)
    auto = repo.get_or_create("cluster-7", automatic=True)
    repo.get_or_create("Taken")
    renamed = client.patch(f"/api/categories/{auto.id}", json={"name": "Sunsets"})
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "Sunsets" and renamed.json()["is_automatic"] is False
    described = client.patch(f"/api/categories/{auto.id}", json={"description": "orange skies"})
    assert described.json()["description"] == "orange skies" and described.json()["name"] == "Sunsets"
    # leaving description out keeps it; null clears it
    assert client.patch(f"/api/categories/{auto.id}", json={"name": "Sunsets"}).json()["description"] == "orange skies"
    assert client.patch(f"/api/categories/{auto.id}", json={"description": None}).json()["description"] is None
    # a case-only rename of itself is fine
    assert client.patch(f"/api/categories/{auto.id}", json={"name": "SUNSETS"}).json()["name"] == "SUNSETS"
    clash = client.patch(f"/api/categories/{auto.id}", json={"name": "taken"})
    assert clash.status_code == 409 and "already exists" in clash.json()["error"]["message"]
    assert client.patch(f"/api/categories/{auto.id}", json={"name": ""}).status_code == 422
    missing = client.patch("/api/categories/987654321", json={"name": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_detail_reports_prototypes_per_model(client: TestClient, session: Session) -> None:
    cat = CategoryRepository(session).get_or_create("Protos")
    session.execute(text("INSERT INTO embedding_models (name, dimension, family) VALUES ('m-protos', 2, 'test')"))
    session.execute(
        text(
            "INSERT INTO category_prototypes (category_id, model_id, kind, ordinal, vector, member_count) "
            "SELECT :c, id, k.kind, k.ord, '[1,0]', k.n FROM embedding_models, "
            "(VALUES ('mean', 0, 10), ('cluster', 0, 6), ('cluster', 1, 4)) AS k(kind, ord, n) WHERE name = 'm-protos'"
        ),
        {"c": cat.id},
    )
    body = client.get(f"/api/categories/{cat.id}").json()
    assert body["name"] == "Protos" and body["prototype_count"] == 3
    protos = {(p["model"], p["kind"]): p for p in body["prototypes"]}
    assert protos[("m-protos", "mean")]["count"] == 1 and protos[("m-protos", "mean")]["member_count"] == 10
    assert protos[("m-protos", "cluster")]["count"] == 2 and protos[("m-protos", "cluster")]["member_count"] == 10
    assert "updated_at" in protos[("m-protos", "mean")]
    assert client.get("/api/categories/987654321").status_code == 404
    assert client.get("/api/categories/nope").status_code == 422


def _activate_tiny_clip(session: Session):  # type: ignore[no-untyped-def]
    from imsrc.embeddings import get_embedder

    tiny = get_embedder("open_clip-tiny-test")
    session.execute(text("UPDATE embedding_models SET is_active = false"))
    models = ModelRepository(session)
    model = models.register(name=tiny.name, dimension=tiny.dimension, family=tiny.family, params={}, supports_text=True)
    models.set_active(model)
    return tiny


def _text_prototype(session: Session, category_id: int) -> list[float]:
    stored = session.execute(
        text("SELECT vector::text FROM category_prototypes WHERE category_id = :c AND kind = 'text'"),
        {"c": category_id},
    ).scalar_one()
    return [float(x) for x in stored.strip("[]").split(",")]


def test_renaming_refreshes_the_text_prototype(client: TestClient, session: Session) -> None:
    # With a CLIP model active, a category's name is also a (text) prototype; a rename must re-read it.
    tiny = _activate_tiny_clip(session)
    auto = CategoryRepository(session).get_or_create("auto-042", automatic=True)
    assert client.patch(f"/api/categories/{auto.id}", json={"name": "Lighthouses"}).status_code == 200
    expected = tiny.encode_texts([TEXT_PROMPT.format(name="Lighthouses")])[0]
    got = _text_prototype(session, auto.id)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5
    kinds = {p["kind"] for p in client.get(f"/api/categories/{auto.id}").json()["prototypes"]}
    assert "text" in kinds


def test_creating_a_category_gives_it_a_text_prototype(client: TestClient, session: Session) -> None:
    # Zero-shot: an empty named category is already something predicted labels can name.
    tiny = _activate_tiny_clip(session)
    resp = client.post("/api/categories", json={"name": "Windmills"})
    assert resp.status_code == 201
    expected = tiny.encode_texts([TEXT_PROMPT.format(name="Windmills")])[0]
    got = _text_prototype(session, resp.json()["id"])
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5
