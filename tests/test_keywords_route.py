"""Search route parameters. GET /api/search/keywords takes the common search parameters; those that need a
query vector or image (match=partial, rerank) were silently ignored (a 200 with plain keyword results). They are
a 422 now, like keywords with match=partial on the other routes. /similar/{id} bounds the id like /images/{id}."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize(("extra", "needle"), [("match=partial", "match=partial"), ("rerank=orb", "rerank")])
def test_keywords_alone_refuse_what_needs_a_query_vector(client: TestClient, extra: str, needle: str) -> None:
    resp = client.get(f"/api/search/keywords?q=sofa&{extra}")
    assert resp.status_code == 422, resp.text
    assert needle in resp.json()["error"]["message"]
    assert client.get("/api/search/keywords?q=sofa").status_code == 200


def test_similar_refuses_an_id_beyond_bigint_like_the_image_routes(client: TestClient) -> None:
    resp = client.get(f"/api/search/similar/{2**63}")
    assert resp.status_code == 422 and "image_id" in resp.json()["error"]["message"], resp.text


def test_image_search_refuses_keywords_given_twice(client: TestClient) -> None:
    """POST /api/search/image takes caption keywords as q or keywords; with both, q was silently dropped."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "green").save(png, format="PNG")
    files = {"file": ("q.png", png.getvalue(), "image/png")}
    resp = client.post("/api/search/image?q=sofa&keywords=chair", files=files)
    assert resp.status_code == 422, resp.text
    assert "either q or keywords" in resp.json()["error"]["message"]
