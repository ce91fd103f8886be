"""A non-editable install (`pip install .`, a wheel) carries every file the package reads."""

from __future__ import annotations

import fnmatch
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_file_that_is_not_code_is_shipped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, data = config["packages"], config["package-data"]
    for path in (ROOT / "heretic_like").rglob("*"):
        if not path.is_file() or path.suffix in (".py", ".pyc"):
            continue
        package = ".".join(path.parent.relative_to(ROOT).parts)
        assert package in packages, f"{path.relative_to(ROOT)}: its folder {package} is not a listed package"
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in data.get(package, [])), (
            f"{path.relative_to(ROOT)} matches no package-data pattern of {package}: a wheel would leave it out"
        )
