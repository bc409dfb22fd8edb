"""Build hook, the one thing pyproject.toml cannot say: ship the web page and the Alembic migrations inside the
package (imsrc/_data/frontend, imsrc/_data/migrations), so an installed wheel serves the page and migrates.
imsrc.resources finds them there, or at the repository root when running from a checkout."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("frontend", "migrations")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout
        target = Path(self.build_lib) / "imsrc" / "_data"
        for name in SHIPPED:
            source = ROOT / name
            if not source.is_dir():
                raise RuntimeError(f"cannot build imsrc: {source} is missing (an sdist without MANIFEST.in's grafts?)")
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))


setup(cmdclass={"build_py": BuildPyWithData})
