"""The search page's caption, categories-only, sample-query and minimum-score features in headless Chromium,
against `imsrc serve` on loopback with the tiny random CLIP (issue 19, items 3 and 4).

Captions arrive through all four routes (the page's upload form, a sidecar at `imsrc index`, `imsrc captions
import`, PATCH /api/images/{id}) and each is found by keyword search on the page, shown under its result."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from imsrc.db.engine import upgrade
from tests.browser_support import running_server
from tests.helpers import make_image, run_cli

pytestmark = pytest.mark.browser

WIDE = {"width": 1280, "height": 860}


@dataclass
class Site:
    base: str
    url: str
    folder: Path
    captions: dict[str, tuple[int, str]]  # keyword -> (image id, caption), one per route


@pytest.fixture(scope="module")
def site(create_database, browser: Any) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    url = create_database("imsrc_browser_features")
    upgrade(url)
    with tempfile.TemporaryDirectory(prefix="imsrc-browser-features-") as tmp, running_server(url, Path(tmp)) as base:
        for n, category in enumerate(("Patterns", "Gradients", "Shapes")):
            files = [
                ("file", (f"{category.lower()}-{i}.png", make_image(500 + 10 * n + i, size=(200, 150)), "image/png"))
                for i in range(4)
            ]
            response = httpx.post(f"{base}/api/images", data={"category": category}, files=files, timeout=120)
            assert response.status_code == 200 and response.json()["new"] == 4, response.text
        yield Site(base, url, Path(tmp), {})


def _page(browser: Any) -> Any:
    page = browser.new_page(viewport=WIDE)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    return page


def _results(page: Any) -> list[dict[str, Any]]:
    page.wait_for_selector(".results .grid .card-link, .results .notice, .results .empty", timeout=60_000)
    cards = page.query_selector_all(".results .grid .card-link")
    if not cards:
        raise AssertionError(f"no results: {page.inner_text('.results')!r}; console: {page.errors}")
    out = []
    for card in cards:
        caption = card.query_selector(".card-caption")
        score = card.query_selector(".score")
        out.append(
            {
                "id": int(card.get_attribute("data-image-id")),
                "caption": caption.inner_text() if caption else None,
                "score": float(score.inner_text()) if score else None,
            }
        )
    return out


def _cli(site: Site, *args: str) -> Any:
    env = {
        "IMSRC_DATABASE_URL": site.url,
        "IMSRC_DATA_DIR": str(site.folder / "cli"),
        "IMSRC_MODEL": "open_clip-tiny-test",
    }
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_captions_from_every_route_are_found_by_keywords_on_the_page(browser: Any, site: Site) -> None:
    page = _page(browser)
    # 1. the page's upload form, with a caption
    upload = site.folder / "lighthouse.png"
    upload.write_bytes(make_image(911, size=(240, 180)))
    page.goto(f"{site.base}/#/upload")
    page.fill("#upload-caption", "a lighthouse at dusk")
    page.set_input_files("#upload-files", [str(upload)])
    page.wait_for_function(
        "() => document.querySelector('.upload-summary').textContent.startsWith('1 of 1 done')", timeout=120_000
    )
    href = page.get_attribute(".upload-row .upload-state a", "href")
    site.captions["lighthouse"] = (int(href.rsplit("/", 1)[1]), "a lighthouse at dusk")
    # 2. a sidecar at `imsrc index`
    shelf = site.folder / "shelf"
    shelf.mkdir()
    (shelf / "quay.png").write_bytes(make_image(912, size=(240, 180)))
    (shelf / "quay.json").write_text(json.dumps({"caption": "trawlers moored at the quay"}))
    assert _cli(site, "index", str(shelf))["captions"]["captions"] == 1
    ids = {r["original_name"]: r["id"] for r in httpx.get(f"{site.base}/api/images?page_size=200").json()["items"]}
    site.captions["trawler"] = (ids["quay.png"], "trawlers moored at the quay")
    # 3. a CSV import (by id)
    csv_file = site.folder / "captions.csv"
    csv_file.write_text(f'id,caption\n{ids["shapes-1.png"]},"a kite, red and yellow"\n')
    assert _cli(site, "captions", "import", str(csv_file)) == {"rows": 1, "changed": 1}
    site.captions["kite"] = (ids["shapes-1.png"], "a kite, red and yellow")
    # 4. PATCH /api/images/{id}, through the image page's caption editor (a caption over the limit is refused
    # with the server's message and changes nothing)
    patched = ids["patterns-2.png"]
    page.goto(f"{site.base}/#/image/{patched}")
    page.click("#caption-edit-button")
    page.fill("#caption-edit", "x" * 2001)
    page.click(".caption-form button[type=submit]")
    page.wait_for_selector(".caption-form .form-error:has-text('at most 2000')")
    page.errors.clear()  # the refused request is logged by the browser as a failed resource
    page.fill("#caption-edit", "an old map of the islands")
    page.click(".caption-form button[type=submit]")
    page.wait_for_selector(".caption-text:has-text('an old map of the islands')")
    assert httpx.get(f"{site.base}/api/images/{patched}").json()["caption"] == "an old map of the islands"
    site.captions["islands"] = (patched, "an old map of the islands")

    for word, (image_id, caption) in site.captions.items():
        page.goto(f"{site.base}/#/search?keywords={word}")
        found = _results(page)
        assert [r["id"] for r in found] == [image_id], (word, found)
        assert found[0]["caption"] == caption
        assert page.inner_text(".results h2") == f"1 result for captions matching “{word}”"
    # Typed into the options' keyword box (Enter), then combined with a "more like this" query: filter keeps
    # only the captioned image, so the similar search for another image returns just it.
    page.goto(f"{site.base}/#/search")
    page.fill("#opt-keywords", "kite")
    page.press("#opt-keywords", "Enter")
    assert [r["id"] for r in _results(page)] == [site.captions["kite"][0]]
    assert "keywords=kite" in page.url
    page.goto(f"{site.base}/#/similar/{ids['shapes-0.png']}?keywords=kite%20or%20islands")
    hybrid = _results(page)
    assert {r["id"] for r in hybrid} == {site.captions["kite"][0], patched}
    assert all(r["caption"] in (site.captions["kite"][1], site.captions["islands"][1]) for r in hybrid)
    assert page.errors == []


def test_which_categories_shows_stage_1_alone_with_scores_and_samples(browser: Any, site: Site) -> None:
    page = _page(browser)
    query = site.folder / "query.png"
    query.write_bytes(make_image(521, size=(200, 150)))  # a Gradients image's picture
    page.goto(f"{site.base}/#/search")
    page.wait_for_selector("#which-categories")
    page.set_input_files("#search-file", str(query))
    _results(page)
    page.click("#which-categories")
    page.wait_for_selector(".category-list .category-row", timeout=60_000)
    rows = page.query_selector_all(".category-row")
    names = [r.query_selector(".category-name").inner_text() for r in rows]
    scores = [float(r.query_selector(".category-score").inner_text().split()[-1]) for r in rows]
    assert {"Patterns", "Gradients", "Shapes"} <= set(names)
    assert scores == sorted(scores, reverse=True)
    assert page.inner_text(".results h2") == "Categories this is like"
    assert "stage 1 only" in page.inner_text(".results .timings")
    for row in rows:  # every category shows some of its own images, and links to them
        assert 1 <= len(row.query_selector_all(".category-samples img")) <= 4
        assert re.fullmatch(r"#/browse/\d+", row.query_selector(".category-samples").get_attribute("href"))
    # No result grid: stage 2 did not run. Choosing a category searches only in it.
    assert not page.query_selector(".results .grid")
    rows[0].query_selector(".category-name").click()
    _results(page)
    assert page.input_value("#opt-category") == names[0]
    assert page.errors == []


def test_an_empty_search_page_offers_sample_queries(browser: Any, site: Site) -> None:
    page = _page(browser)
    page.goto(f"{site.base}/#/search")
    page.wait_for_selector(".samples .sample-query", timeout=30_000)
    samples = page.query_selector_all(".samples .sample-query")
    assert 1 <= len(samples) <= 6
    first = int(samples[0].get_attribute("data-image-id"))
    samples[0].click()
    page.wait_for_url(re.compile(rf"#/similar/{first}"))
    found = _results(page)
    assert first not in [r["id"] for r in found] and len(found) >= 3
    assert not page.query_selector(".samples")
    assert page.errors == []


def test_minimum_score_hides_weaker_results(browser: Any, site: Site) -> None:
    page = _page(browser)
    ids = {r["original_name"]: r["id"] for r in httpx.get(f"{site.base}/api/images?page_size=200").json()["items"]}
    page.goto(f"{site.base}/#/similar/{ids['gradients-0.png']}?k=12")
    full = _results(page)
    scores = sorted(r["score"] for r in full)
    cut = round(scores[len(scores) // 2], 3)
    page.fill("#opt-min-score", str(cut))
    page.dispatch_event("#opt-min-score", "change")
    page.wait_for_function(
        f"() => document.querySelectorAll('.results .grid .card-link').length < {len(full)}", timeout=60_000
    )
    kept = _results(page)
    assert kept and all(r["score"] >= cut - 0.0005 for r in kept)  # cards show scores to 3 digits
    assert f"min_score={cut}" in page.url
    assert page.errors == []
