"""The project's local instance as a command or the demo needs it: the project database ready and
exported, and DAGSTER_HOME pointing at the project's own Dagster instance folder.

No Dagster import and no CLI here: the commands in ``imgpipe_dagster.cli`` and ``imgpipe_dagster.demo``
call these.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from imgpipe_dagster.environment import HOME_ENV
from imgpipe_dagster.paths import imgpipe_home, project_root, resources_dir
from imgpipe_dagster.store import database as db


def project_file(name: str) -> Path:
    """dagster.yaml / workspace.yaml from the checkout, or the copy shipped inside the wheel."""
    root = project_root()
    if root and (root / name).is_file():
        return root / name
    return resources_dir() / "instance" / name


def prepare_environment() -> str:
    """Resolve (and start if embedded) the database, migrate it, export the URLs; returns the URL."""
    url = db.resolve_database_url()
    db.prepare_databases(url)
    db.export_environment(url)
    return url


def dagster_home() -> Path:
    """$IMGPIPE_HOME/dagster_home holding the project's dagster.yaml; exported as DAGSTER_HOME."""
    home = imgpipe_home() / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project_file("dagster.yaml"), home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault(HOME_ENV, str(imgpipe_home()))
    return home
