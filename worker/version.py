"""The installed Pleura version (from the distribution metadata)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pleura")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
