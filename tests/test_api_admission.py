"""Admission control for searches (api/admission.py, IMSRC_SEARCH_CONCURRENCY): at most N searches of a server
process run at once, the rest wait in the event loop, and routes that are not searches never wait for a turn."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from imsrc.api.admission import SearchAdmission
from imsrc.api.app import create_app
from imsrc.api.deps import get_session
from imsrc.config import Settings
from imsrc.db.session import Database
from imsrc.errors import BusyError
from imsrc.search.service import SearchService
from imsrc.search.urlfetch import UrlFetcher
from tests.fixtures.database import bound_database


def test_at_most_limit_searches_run_at_once() -> None:
    admission = SearchAdmission(2, 30.0)
    running = peak = 0
    guard = threading.Lock()

    def work() -> int:
        nonlocal running, peak
        with guard:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with guard:
            running -= 1
        return 1

    async def main() -> list[int]:
        return await asyncio.gather(*(admission.run(work) for _ in range(8)))

    assert asyncio.run(main()) == [1] * 8
    assert peak == 2


def test_a_search_that_waits_too_long_is_told_to_retry() -> None:
    admission = SearchAdmission(1, 0.2)

    async def main() -> None:
        slow = asyncio.create_task(admission.run(time.sleep, 1.0))
        await asyncio.sleep(0.05)
        with pytest.raises(BusyError) as refused:
            await admission.run(lambda: None)
        assert refused.value.status_code == 503 and refused.value.retry_after >= 1
        await slow
        assert await admission.run(lambda: 7) == 7  # the slot was handed back

    asyncio.run(main())


@pytest.fixture()
def one_search_client(
    settings: Settings, database: Database, connection: Connection, session: Session
) -> Iterator[TestClient]:
    one = settings.model_copy(update={"search_concurrency": 1})
    app = create_app(one, database=bound_database(database, connection))
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app) as c:
        yield c


def test_a_held_search_makes_the_next_search_wait_but_not_listing(
    one_search_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []
    similar = SearchService.similar

    def held(self, image_id, options):  # type: ignore[no-untyped-def]
        calls.append(image_id)
        entered.set()
        release.wait(30)
        return similar(self, image_id, options)

    monkeypatch.setattr(SearchService, "similar", held)
    answers: dict[int, int] = {}

    def search(image_id: int) -> None:
        answers[image_id] = one_search_client.get(f"/api/search/similar/{image_id}").status_code

    first = threading.Thread(target=search, args=(999_001,))
    second = threading.Thread(target=search, args=(999_002,))
    try:
        first.start()
        assert entered.wait(30)
        second.start()
        time.sleep(0.3)
        # The second search waits for the one slot; a listing does not.
        assert one_search_client.get("/api/images").status_code == 200
        assert calls == [999_001] and not answers
    finally:
        release.set()
        first.join(30)
        second.join(30)
    # Both ran once the slot was free (409/404: this empty catalog has no model, no such image), neither was
    # refused as busy.
    assert sorted(answers) == [999_001, 999_002] and sorted(calls) == [999_001, 999_002]
    assert answers[999_001] == answers[999_002] and answers[999_001] in (404, 409)


@pytest.mark.parametrize("route", ["/api/search/image", "/api/search/categories"])
def test_a_slow_image_url_does_not_hold_a_search_turn(
    one_search_client: TestClient, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """A query image given by URL is fetched before the search takes its turn: a remote server that answers slowly
    (up to IMSRC_URL_FETCH_TIMEOUT_S, and anyone may send such URLs) must not keep the few search turns, and with
    them every other search of the worker, waiting for it."""
    entered, release = threading.Event(), threading.Event()

    def slow_fetch(self, url):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(30)
        return b"not an image"

    monkeypatch.setattr(UrlFetcher, "fetch", slow_fetch)
    answers: dict[str, int] = {}

    def ask(name: str, call) -> None:  # type: ignore[no-untyped-def]
        answers[name] = call().status_code

    by_url = threading.Thread(
        target=ask, args=("url", lambda: one_search_client.post(route, json={"url": "https://example.com/a.jpg"}))
    )
    other = threading.Thread(target=ask, args=("similar", lambda: one_search_client.get("/api/search/similar/1")))
    try:
        by_url.start()
        assert entered.wait(30)
        other.start()
        other.join(15)
        assert "similar" in answers, "a search waited for another search's URL fetch"
        assert answers["similar"] in (404, 409) and "url" not in answers
    finally:
        release.set()
        by_url.join(30)
        other.join(30)
    assert answers["url"] in (409, 422)  # fetched, then refused here (no model / not an image), never busy
