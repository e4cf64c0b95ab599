"""The version of dora-diffusion; pyproject.toml states the same (tests/test_installs.py checks that)."""

__version__ = "0.1.0"
