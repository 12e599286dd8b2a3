"""The workbench's version: one place, read by the package face, the run and cache files' headers and
``pyproject.toml`` (``[tool.setuptools.dynamic]``)."""

__version__ = "0.1.0"
