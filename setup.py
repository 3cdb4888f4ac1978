"""Copies the top-level resources/ folder into the wheel as imgpipe_dagster/_resources."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithResources(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "resources"
        target = Path(self.build_lib) / "imgpipe_dagster" / "_resources"
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        # profiles/ and the instance files live at the top level of a checkout; the wheel carries copies
        shutil.copytree(Path(__file__).parent / "profiles", target / "profiles", dirs_exist_ok=True)
        (target / "instance").mkdir(parents=True, exist_ok=True)
        for name in ("dagster.yaml", "workspace.yaml"):
            shutil.copyfile(Path(__file__).parent / name, target / "instance" / name)


setup(cmdclass={"build_py": BuildWithResources})
