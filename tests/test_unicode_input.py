"""Text that is not valid Unicode: a lone surrogate, from a JSON escape ("\\ud800") or from command-line bytes
that are not UTF-8 (Python decodes argv with surrogateescape). PostgreSQL cannot store it; the encode failed
deep in the driver (a 500, a traceback). It must be the usual 422 / one-line error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from imsrc.catalog.captions import clean_caption
from imsrc.errors import InvalidInputError
from imsrc.search.keywords import check_keywords
from tests.fixtures.api import add_image


def test_patch_caption_with_a_lone_surrogate_is_a_422(client: TestClient, session: Session) -> None:
    image = add_image(session, 5)
    resp = client.patch(
        f"/api/images/{image.id}", content=b'{"caption": "a\\ud800b"}', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422, resp.text
    assert "not valid Unicode" in resp.json()["error"]["message"]
    assert client.get(f"/api/images/{image.id}").json()["caption"] is None


@pytest.mark.parametrize("check", [clean_caption, check_keywords])
def test_argv_bytes_that_are_not_utf8_are_refused(check) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        check(b"caf\xe9".decode("utf-8", "surrogateescape"))
