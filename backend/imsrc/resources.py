"""Where the files that ship beside the code live: the web page (frontend/) and the Alembic migrations.

A checkout, or an editable install of one, has them at the repository root. A built wheel carries them inside the
package, under imsrc/_data/ (setup.py copies them there at build time), because nothing outside site-packages is
installed. Both places are looked at, the package first, so one code path serves both.
"""

from __future__ import annotations

from pathlib import Path

from imsrc.errors import ConfigurationError

PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
CHECKOUT = Path(__file__).resolve().parents[2]  # backend/imsrc/resources.py -> the repository root


def _find(name: str, marker: str) -> Path | None:
    for base in (PACKAGE_DATA, CHECKOUT):
        candidate = base / name
        if (candidate / marker).is_file():
            return candidate
    return None


def frontend_dir() -> Path | None:
    """The web page's folder, or None when this installation has none (the API still works)."""
    return _find("frontend", "index.html")


def migrations_dir() -> Path:
    """The Alembic script directory (env.py and versions/)."""
    found = _find("migrations", "env.py")
    if found is None:
        raise ConfigurationError(
            f"imsrc's database migrations are missing from this installation (looked in {PACKAGE_DATA} and "
            f"{CHECKOUT}); reinstall imsrc from a wheel or run it from a checkout"
        )
    return found


def alembic_ini() -> Path | None:
    """alembic.ini beside the migrations (a checkout has one, for plain `alembic` commands); a wheel needs none."""
    ini = migrations_dir().parent / "alembic.ini"
    return ini if ini.is_file() else None
