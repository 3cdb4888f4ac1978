"""Where the project's files live, both in a checkout and in an installed wheel.

Non-code files sit in the top-level ``resources/`` folder of a checkout; the wheel build copies
them into ``imgpipe_dagster/_resources`` (see setup.py), so one lookup serves both layouts.
"""

from __future__ import annotations

from pathlib import Path

from imgpipe_dagster.environment import IMAGE_STORE_DEFAULT, read_environment

_PACKAGE_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    installed = _PACKAGE_DIR / "_resources"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE_DIR.parent / "resources"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"imgpipe resources not found (looked in {installed} and {checkout}); reinstall the package"
    )


def resource_path(relative: str) -> Path:
    """Path of a shipped non-code file, e.g. ``resource_path("sql")`` or ``"prompts/analysis_v1.txt"``."""
    path = resources_dir() / relative
    if not path.exists():
        raise FileNotFoundError(f"imgpipe resource missing: {relative} (in {resources_dir()})")
    return path


def project_root() -> Path | None:
    """The checkout this package runs from, or None for an installed wheel."""
    root = _PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None


def imgpipe_home() -> Path:
    """State folder (embedded database, Dagster home, GPU server records): ``$IMGPIPE_HOME`` or ./.imgpipe."""
    configured = read_environment().home
    home = Path(configured) if configured else Path.cwd() / ".imgpipe"
    return home.resolve()


def image_store_dir() -> Path | None:
    """Base path of the opt-in image store (``IMGPIPE_IMAGE_STORE``), or None when it is off."""
    configured = read_environment().image_store
    if configured is None:
        return None
    return imgpipe_home() / "image-store" if configured == IMAGE_STORE_DEFAULT else Path(configured)


def gpu_server_records_dir(home: Path | None = None) -> Path:
    """Where the launcher keeps one record, settings file, lock and log per managed GPU server, under
    ``home`` (a state folder given to a child process) or this process's ``imgpipe_home()``."""
    return (imgpipe_home() if home is None else home) / "gpu-servers"
