"""End to end in headless Chromium against `imsrc serve` on loopback, with the tiny random CLIP model.

Screenshots go to IMSRC_SCREENSHOT_DIR (set it to docs/screenshots to refresh the README's), else a temp dir.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imsrc.db.engine import upgrade
from tests.browser_support import running_server, screenshot_dir
from tests.helpers import make_image

pytestmark = pytest.mark.browser

WIDE = {"width": 1280, "height": 860}
DATABASES: dict[str, str] = {}  # server base URL -> its database
NARROW = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(create_database, browser: Any) -> Iterator[str]:  # type: ignore[no-untyped-def]
    import tempfile

    url = create_database("imsrc_browser")
    upgrade(url)
    with tempfile.TemporaryDirectory(prefix="imsrc-browser-") as tmp, running_server(url, Path(tmp)) as base:
        _seed(base)
        DATABASES[base] = url
        yield base


def _seed(base: str) -> None:
    """Other images in other categories, through the REST API, so the searches have something to skip."""
    import httpx

    for n, category in enumerate(("Patterns", "Gradients", "Shapes")):
        files = [
            ("file", (f"{category.lower()}-{i}.png", make_image(700 + 10 * n + i, size=(240, 180)), "image/png"))
            for i in range(4)
        ]
        response = httpx.post(f"{base}/api/images", data={"category": category}, files=files, timeout=120)
        assert response.status_code == 200 and response.json()["new"] == 4, response.text


@pytest.fixture(scope="module")
def images() -> Iterator[list[Path]]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="imsrc-browser-img-") as tmp:
        paths = []
        for seed, name in ((901, "sunset.png"), (902, "harbour.png"), (903, "meadow.png")):
            path = Path(tmp) / name
            path.write_bytes(make_image(seed, size=(320, 240)))
            paths.append(path)
        yield paths


def _page(browser: Any, viewport: dict[str, int]) -> Any:
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    return page


def _shot(page: Any, path: Path) -> None:
    """A full-page screenshot once every image (lazy ones too) has loaded and decoded."""
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    # Functions, not expression strings: Playwright evals a string inside the page, which its CSP forbids.
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=15_000)
    page.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    # 256 colours, dithered, keep the committed copies to a fifth of the size with no visible banding.
    from PIL import Image

    with Image.open(path) as shot:
        rgb = shot.convert("RGB")
    palette = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


def _results(page: Any) -> None:
    """Wait for a results grid; if an error or nothing shows instead, fail saying what the page shows."""
    page.wait_for_selector(".results .grid .card-link, .results .notice, .results .empty", timeout=60_000)
    if not page.query_selector(".results .grid .card-link"):
        raise AssertionError(f"no results: {page.inner_text('.results')!r}; console: {page.errors}")


def _upload(page: Any, base: str, files: list[Path], category: str) -> dict[str, int]:
    page.goto(f"{base}/#/upload")
    page.fill("#upload-category", category)
    page.set_input_files("#upload-files", [str(f) for f in files])
    n = len(files)
    page.wait_for_function(
        f"() => document.querySelector('.upload-summary').textContent.startsWith('{n} of {n} done')", timeout=120_000
    )
    ids = {}
    for row in page.query_selector_all(".upload-row"):
        name = row.query_selector(".upload-name").inner_text()
        link = row.query_selector(".upload-state a")
        assert link is not None, row.inner_text()
        ids[name] = int(link.get_attribute("href").rsplit("/", 1)[1])
    return ids


def test_upload_search_detail_and_text_search(browser: Any, server: str, images: list[Path]) -> None:
    shots = screenshot_dir()
    page = _page(browser, WIDE)

    # 1. upload two images through the page: each gets a progress bar and a result
    ids = _upload(page, server, images[:2], "Scenery")
    assert set(ids) == {"sunset.png", "harbour.png"}
    summary = page.inner_text(".upload-summary")
    assert "2 new" in summary and "0 failed" in summary
    assert page.eval_on_selector_all(".upload-row progress", "els => els.map(e => e.value)") == [100, 100]
    _shot(page, shots / "upload.png")

    # 2. search with one of them (picked as a file): it comes back first
    page.goto(f"{server}/#/search")
    page.set_input_files("#search-file", str(images[0]))
    _results(page)
    first = page.get_attribute(".results .grid .card-link", "data-image-id")
    assert int(first) == ids["sunset.png"]
    head = page.inner_text(".results-head")
    assert "sunset.png" in head and "total" in head
    assert page.inner_text(".results .grid .card .score").startswith(("1.000", "0.99"))
    # the same picture is a near-duplicate of the query (pHash distance 0): marked with a badge and in its label
    assert page.inner_text(".results .grid .card >> nth=0 >> .badge.match") == "duplicate"
    assert "near-duplicate of the query" in page.get_attribute(".results .grid .card-link >> nth=0", "aria-label")
    # the card names its file (not "Image N") and shows dimensions and size on hover
    assert page.get_attribute(".results .grid .card-link >> nth=0", "aria-label").startswith("sunset.png")
    hover = page.get_attribute(".results .grid .card-link >> nth=0", "title")
    assert hover.startswith("sunset.png · ") and "\u00d7" in hover  # width x height
    badges = page.eval_on_selector_all(".results .grid .card", "els => els.map(e => !!e.querySelector('.badge.match'))")
    assert badges[0] and len(badges) > 1 and not all(badges)
    # a comparator re-ranks the same query (the option change runs it again); the duplicate stays first
    page.select_option("#opt-rerank", "histogram")
    page.locator(".results .timings", has_text="re-ranked by histogram").wait_for()
    assert int(page.get_attribute(".results .grid .card-link", "data-image-id")) == ids["sunset.png"]
    assert "re-rank score" in page.get_attribute(".results .grid .card-link >> nth=1", "aria-label")
    assert "rerank=histogram" in page.url
    page.select_option("#opt-rerank", "")
    page.locator(".results .timings", has_text="re-ranked").wait_for(state="detached")
    page.wait_for_selector(".results .timings")
    _shot(page, shots / "search.png")

    # 3. open its detail page from the results
    page.click(".results .grid .card-link >> nth=0")
    page.wait_for_url(re.compile(rf"#/image/{ids['sunset.png']}$"))
    page.wait_for_selector(".detail h1")
    assert page.inner_text(".detail h1") == "sunset.png"
    meta = page.inner_text(".meta")
    assert "Scenery" in meta and "320 \u00d7 240" in meta and "open_clip-tiny-test" in meta
    page.wait_for_selector(".similar .grid .card-link, .similar p.muted")
    similar_ids = page.eval_on_selector_all(".similar .card-link", "els => els.map(e => +e.dataset.imageId)")
    assert ids["harbour.png"] in similar_ids and ids["sunset.png"] not in similar_ids
    assert page.evaluate("document.querySelector('img.full').naturalWidth") == 320
    _shot(page, shots / "image.png")

    # 4. a text search with the tiny CLIP (random weights: any order, but real results and timings)
    page.goto(f"{server}/#/search")
    page.fill("#q", "a red sunset over the sea")
    page.keyboard.press("Enter")
    _results(page)
    assert "“a red sunset over the sea”" in page.inner_text(".results-head h2")
    assert page.url.endswith("q=a+red+sunset+over+the+sea") or "q=a+red+sunset" in page.url
    found = page.eval_on_selector_all(".results .card-link", "els => els.map(e => +e.dataset.imageId)")
    assert len(found) == len(set(found)) > 0  # random weights: which images is not meaningful, that they come is
    assert "total" in page.inner_text(".timings")
    _shot(page, shots / "text-search.png")

    # the text search is linkable: loading its URL runs it again
    page.goto(page.url)
    page.reload()
    _results(page)
    assert page.input_value("#q") == "a red sunset over the sea"
    assert page.errors == []


def test_browse_keyboard_and_narrow_screen(browser: Any, server: str, images: list[Path]) -> None:
    shots = screenshot_dir()
    page = _page(browser, WIDE)
    _upload(page, server, [images[2]], "Fields")
    # a file that is not an image fails with its reason, and nothing else happens
    bogus = images[2].with_name("notes.txt")
    bogus.write_text("not an image")
    page.reload()  # a fresh upload view (the hash is already #/upload)
    page.set_input_files("#upload-files", str(bogus))
    page.wait_for_selector(".upload-row.failed")
    assert page.inner_text(".upload-summary").endswith("0 new, 0 duplicate, 1 failed")
    reason = page.inner_text(".upload-row.failed .upload-state")
    assert reason.startswith("failed") and "image" in reason and "notes.txt" not in reason
    page.errors.clear()  # the browser logs that 422 as a failed resource load: expected here

    page.goto(f"{server}/#/browse")
    page.wait_for_selector(".cat-card")
    names = page.eval_on_selector_all(".cat-name", "els => els.map(e => e.firstChild.textContent)")
    assert "Fields" in names and "All images" in names
    assert "active model" in page.inner_text(".status").lower()
    _shot(page, shots / "browse.png")

    # keyboard only: Tab reaches the nav links with a visible focus ring, Enter follows them
    page.goto(f"{server}/#/browse/all")
    page.reload()
    page.wait_for_selector(".grid")
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('data-nav')") == "browse":
            break
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"#/browse$"))
    page.wait_for_selector(".cat-card")
    # the settings dialog opens with Enter and closes with Escape, giving focus back
    page.focus("[data-open-settings]")
    page.keyboard.press("Enter")
    assert page.is_visible("[data-settings-dialog]")
    page.keyboard.press("Escape")
    assert not page.is_visible("[data-settings-dialog]")

    # a narrow screen: the nav collapses behind a menu button, the grid reflows to fit
    narrow = _page(browser, NARROW)
    narrow.goto(f"{server}/#/browse/all")
    narrow.wait_for_selector(".grid .card-link")
    assert not narrow.is_visible("#nav a[data-nav='upload']")
    narrow.click("[data-menu-toggle]")
    assert narrow.is_visible("#nav a[data-nav='upload']")
    narrow.keyboard.press("Escape")
    assert not narrow.is_visible("#nav a[data-nav='upload']")
    widest = narrow.evaluate("document.documentElement.scrollWidth")
    assert widest <= NARROW["width"], "no horizontal scrolling on a phone"
    columns = narrow.evaluate("getComputedStyle(document.querySelector('.grid')).gridTemplateColumns.split(' ').length")
    assert columns == 2
    _shot(narrow, shots / "narrow.png")
    assert page.errors == [] and narrow.errors == []


def test_text_search_is_explained_away_for_an_image_only_model(browser: Any, server: str) -> None:
    # The server runs the tiny CLIP; make the page believe the active model is image-only by rewriting the one
    # field of the real /api/status answer that says so, and check that no text query is sent.
    page = _page(browser, WIDE)

    def image_only(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["text_search"] = False
        body["search_model"] = {**(body["search_model"] or {}), "name": "efficientnet-lite0", "supports_text": False}
        route.fulfill(response=response, json=body)

    page.route("**/api/status", image_only)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/api/search/text" in r.url else None)
    page.goto(f"{server}/#/search")
    page.wait_for_selector("#q")
    assert page.get_attribute("#q", "placeholder") == "Paste an image URL"
    help_text = page.inner_text("#q-help")
    assert "Text search is off" in help_text and "efficientnet-lite0" in help_text
    page.fill("#q", "a red sunset")
    page.keyboard.press("Enter")
    page.wait_for_selector(".results .notice")
    assert "understands images only" in page.inner_text(".results .notice")
    assert sent == []


def test_partial_switch_explains_missing_regions_then_draws_the_box(browser: Any, server: str, scratch: Path) -> None:
    """Region search in the page: without region vectors the switch shows what to run; after
    `imsrc embed --regions` a crop's source comes first with a 'partial' badge and its box outlined."""
    import io

    import httpx
    from PIL import Image

    from imsrc.config import Settings
    from imsrc.embeddings import get_embedder
    from imsrc.ingest.embed_regions import embed_regions
    from tests.fixtures.database import database_for

    source = make_image(990, size=(320, 240))
    response = httpx.post(
        f"{server}/api/images",
        data={"category": "Crops"},
        files=[("file", ("poster.png", source, "image/png"))],
        timeout=120,
    )
    poster = response.json()["results"][0]["id"]
    crop = scratch / "corner.png"
    buf = io.BytesIO()
    Image.open(io.BytesIO(source)).crop((160, 120, 320, 240)).save(buf, "PNG")  # the bottom-right quarter
    crop.write_bytes(buf.getvalue())
    page = _page(browser, WIDE)
    page.goto(f"{server}/#/search")
    page.set_input_files("#search-file", str(crop))
    _results(page)
    page.check("#opt-partial")
    page.locator(".results", has_text="imsrc embed --regions").wait_for()
    assert "match=partial" in page.url
    settings = Settings(
        database_url=DATABASES[server], data_dir=scratch / "data", model="open_clip-tiny-test", _env_file=None
    )  # type: ignore[call-arg]
    database = database_for(settings, migrate=False)
    try:
        assert embed_regions(database, get_embedder("open_clip-tiny-test")).failed == 0
    finally:
        database.dispose()
    page.uncheck("#opt-partial")
    _results(page)
    page.check("#opt-partial")
    page.locator(".results .timings", has_text="region search").wait_for()
    first = page.locator(".results .grid .card >> nth=0")
    assert int(first.locator(".card-link").get_attribute("data-image-id")) == poster
    assert first.locator(".badge.match").inner_text() == "partial"
    assert "part of it matched (from 50%, 50% to 100%, 100%" in first.locator(".card-link").get_attribute("aria-label")
    # the box is drawn over the bottom-right quarter of the (whole, uncropped) thumbnail
    frame = first.locator(".thumb-frame").bounding_box()
    box = first.locator(".match-box").bounding_box()
    assert frame and box and abs(frame["width"] / frame["height"] - 320 / 240) < 0.05
    assert abs(box["x"] - (frame["x"] + frame["width"] / 2)) < 3
    assert abs(box["y"] - (frame["y"] + frame["height"] / 2)) < 3
    assert abs(box["width"] - frame["width"] / 2) < 3 and abs(box["height"] - frame["height"] / 2) < 3
    assert [e for e in page.errors if "409 (Conflict)" not in e] == []  # the 409 is the first, expected answer
    _shot(page, screenshot_dir() / "search-partial.png")


def test_api_docs_render_from_local_files_under_their_csp(browser: Any, server: str) -> None:
    """/docs: Swagger UI from the package, pinned, with no CSP violation and no outside request (the page keeps
    the API key on this origin)."""
    page = _page(browser, WIDE)
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else outside.append(r.url))
    page.goto(f"{server}/docs")
    page.wait_for_selector(".opblock-tag", timeout=30_000)
    assert outside == [], outside
    assert page.errors == [], page.errors
