"""owngpt's version: one place, read by the package, the CLI, reports, data dirs and the server (pyproject.toml
repeats it for the packaging tools)."""

__version__ = "0.1.0"
