"""The app factory each `imsrc serve --workers N` process imports (uvicorn's `--factory` entry point).

A worker is a fresh interpreter (uvicorn spawns them): it reads the same settings from the environment as the
parent (which put the chosen host and port there), configures the same logging, and builds its own app, database
pool and search runtime. Models and FAISS indexes load on first use in each worker, never in the parent.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

# The database URL the parent resolved (and, for the embedded server, started): a worker that starts after the
# database was stopped must not start it again behind the operator's back. Not IMSRC_DATABASE_URL, which would
# also change what the settings say (embedded or not).
DATABASE_URL_ENV = "IMSRC_SERVE_RESOLVED_DATABASE_URL"


def worker_app() -> FastAPI:
    # Imported here, not above: the supervisor of `serve --workers N` imports this module for DATABASE_URL_ENV
    # and must not import the app with it (torch, the models' code: ~0.5 GB of memory in a process that only
    # watches its workers).
    from imsrc.api.app import create_app
    from imsrc.config import Settings
    from imsrc.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_format, logging.INFO, server=True)
    return create_app(settings, database_url=os.environ.get(DATABASE_URL_ENV) or None)
