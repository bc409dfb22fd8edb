""".env.example is the settings' documentation: it lists every setting once, with the default the code uses."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from imsrc.config import Settings


@pytest.fixture()
def no_imsrc_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("IMSRC_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_imsrc_environment")
def test_env_example_lists_every_setting_with_its_default(repo_root: Path) -> None:
    example = repo_root / ".env.example"
    keys = re.findall(r"^(IMSRC_[A-Z0-9_]+)=", example.read_text(), re.M)
    assert sorted(keys) == sorted({f"IMSRC_{name.upper()}" for name in Settings.model_fields})
    assert len(keys) == len(set(keys))
    # Loaded as a .env file, it must change nothing: blank optional settings mean unset (not "" or Path(".")).
    copied = Settings(_env_file=example)  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert copied.model_dump() == defaults.model_dump()


@pytest.mark.usefixtures("no_imsrc_environment")
def test_blank_optional_settings_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL_CHECKPOINT", "MODEL_CACHE_DIR", "API_KEY", "READER_URL", "DATABASE_URL"):
        monkeypatch.setenv(f"IMSRC_{name}", "")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.model_checkpoint, s.model_cache_dir, s.api_key, s.reader_url, s.database_url) == (None,) * 5
