"""Test setup. The fixtures live in tests/fixtures (database.py, api.py) and are loaded here for every module:
a real PostgreSQL (the embedded server, or IMSRC_TEST_DATABASE_URL), a fresh database migrated with
`alembic upgrade head`, each test inside a transaction that is rolled back, and the API on that transaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.database", "tests.fixtures.api", "tests.fixtures.citus", "tests.fixtures.browser"]

# Tests run torch unless they ask for another engine (tests/test_inference.py): an ONNX export on first load
# would slow every test that builds a model. Subprocesses inherit it (tests/helpers.run_cli keeps it).
os.environ.setdefault("IMSRC_INFERENCE", "torch")
# TestClient sends `Host: testserver`, which the app's Host allow-list (against DNS rebinding) would refuse.
os.environ.setdefault("IMSRC_ALLOWED_HOSTS", '["testserver"]')


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
