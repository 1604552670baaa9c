"""Package layout that pyproject.toml cannot express alone: the Hydra configs live in the repository's
top-level ``conf/`` and ship inside the wheel as ``qwha/conf/`` (see ``qwha.config.CONF_DIR``), so a
non-editable ``pip install .`` runs from any folder."""

from setuptools import find_namespace_packages, setup

CONF = ["qwha.conf", *(f"qwha.conf.{p}" for p in find_namespace_packages(where="conf"))]

setup(
    # Namespace discovery: data-only folders (qwha/eval/tasks) count as packages, so their files ship.
    packages=[*find_namespace_packages(include=["qwha", "qwha.*"], exclude=["*__pycache__*"]), *CONF],
    package_dir={"qwha.conf": "conf"},
)
