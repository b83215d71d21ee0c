"""Build hook; the project itself is configured in pyproject.toml.

A built qin (wheel, or `pip install .`) also carries the root `qin.yaml` and `configs/*.yaml`, as
`qin/defaults/qin.yaml` and `qin/defaults/configs/*.yaml`: the same relative layout, so a variant's
`base: ../qin.yaml` still resolves. The root files stay the only copies in a checkout (where the README and
users read them); an installed qin finds its copies with `importlib.resources.files("qin") / "defaults"`.
MANIFEST.in puts the root files into the sdist, so a wheel built from the sdist has them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULTS = ("qin", "defaults")  # where the root config files go inside the package


def default_configs() -> list[str]:
    """qin.yaml and configs/*.yaml, as paths relative to the project root."""
    return ["qin.yaml", *sorted(f"configs/{path.name}" for path in (ROOT / "configs").glob("*.yaml"))]


class BuildPyWithDefaults(build_py):
    """build_py that also copies the root config files into the package's build folder."""

    def default_config_mapping(self) -> dict[str, str]:
        """{build path: source path} of each root config file."""
        target = os.path.join(self.build_lib, *DEFAULTS)
        return {os.path.join(target, *name.split("/")): str(ROOT / name) for name in default_configs()}

    def build_package_data(self) -> None:
        super().build_package_data()
        for target, source in self.default_config_mapping().items():
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), **self.default_config_mapping()}


setup(cmdclass={"build_py": BuildPyWithDefaults})
