"""The package version, read by ``__init__``, the file headers and pyproject."""

__version__ = "0.1.0"
