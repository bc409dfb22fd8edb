"""A schemathesis run against the live /openapi.json of a real server: no server errors, responses conform
to the documented schema, status codes and content types."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import make_image

pytestmark = pytest.mark.skipif(
    shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None,
    reason="schemathesis is not installed (pip install -e '.[dev]')",
)


def test_schemathesis_against_live_openapi(live_server: tuple[str, dict[str, str]]) -> None:
    import httpx

    base, _ = live_server
    # Something to find, so routes taking an id have a real one too.
    files = [("file", (f"s{i}.png", make_image(i), "image/png")) for i in range(3)]
    assert httpx.post(base + "/api/images", files=files, data={"category": "seed"}, timeout=120).status_code == 200
    exe = str(Path(sys.executable).parent / "schemathesis")
    result = subprocess.run(
        [
            exe,
            "run",
            base + "/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            os.environ.get("IMSRC_SCHEMATHESIS_EXAMPLES", "25"),
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "60",
            "--generation-deterministic",
        ],
        # A scratch working directory keeps schemathesis' cache out of the repository.
        capture_output=True,
        text=True,
        cwd=tempfile.mkdtemp(prefix="imsrc-st-"),
        timeout=900,
    )
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail
