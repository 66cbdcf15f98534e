"""The exceptions owngpt raises for problems a user can fix.

Every user-facing failure is an `OwnGPTError` whose message names the file, line or field and says what to do.
`owngpt.cli.main` prints it as one line (`error: ...`) and exits non-zero, without a traceback. Library users can
catch `OwnGPTError` (or a subclass) instead.
"""

from __future__ import annotations


class OwnGPTError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    exit_code = 2


class DataError(OwnGPTError):
    """Bad input data: names file:line (or file:offset) and the fix."""


class ConfigError(OwnGPTError):
    """A bad setting: names the flag or config key and the accepted values."""


class CheckpointError(OwnGPTError):
    """A missing, corrupt or incompatible checkpoint or model directory."""


class MissingExtraError(OwnGPTError):
    """An optional dependency is not installed; says which `pip install 'owngpt[extra]'` brings it."""


def require(module: str, extra: str):
    """Import `module` or raise a MissingExtraError naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"this command needs the Python package '{module.split('.')[0]}': pip install 'owngpt[{extra}]'"
        ) from e
