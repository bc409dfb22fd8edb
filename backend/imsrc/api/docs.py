"""/docs (Swagger UI) from files imsrc serves itself, each pinned with a Subresource Integrity hash.

FastAPI's defaults load the latest Swagger UI and ReDoc from a CDN without integrity hashes, on the origin where
the page keeps the API key: whoever could change those files could read the key. Here the files come from the
fastapi-offline package (Swagger UI 5, which renders OpenAPI 3.1), and the page carries no inline script, so the
docs' Content-Security-Policy can forbid every other script. There is no /redoc: ReDoc fetches its logo from its
vendor's CDN and needs a blob: worker, and Swagger UI documents the same schema.
"""

from __future__ import annotations

import base64
import hashlib
import html
from functools import lru_cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"
SWAGGER_INIT = """\
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""


def assets_dir() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


@lru_cache(maxsize=8)
def integrity(name: str) -> str:
    digest = hashlib.sha384((assets_dir() / name).read_bytes()).digest()
    return "sha384-" + base64.b64encode(digest).decode()


def _script(name: str) -> str:
    return f'<script src="{ASSETS_URL}/{name}" integrity="{integrity(name)}"></script>'


def swagger_page(title: str) -> str:
    css = "swagger-ui.css"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)} — API</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="{ASSETS_URL}/{css}" integrity="{integrity(css)}">
</head>
<body>
<div id="swagger-ui"></div>
{_script("swagger-ui-bundle.js")}
<script src="/docs/init.js" integrity="{_init_integrity()}"></script>
</body>
</html>
"""


def _init_integrity() -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(SWAGGER_INIT.encode()).digest()).decode()


def install_docs(app: FastAPI) -> None:
    """Routes for /docs and its files (create the app with docs_url=None, redoc_url=None)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return HTMLResponse(swagger_page(app.title))

    @router.get("/docs/init.js")
    def docs_init() -> Response:
        return Response(SWAGGER_INIT, media_type="text/javascript")

    app.include_router(router)
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
