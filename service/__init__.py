"""The gesture service: HTTP API, WebSocket gateway, events on Redis."""

from importlib import metadata

try:
    __version__ = metadata.version("gesture-service")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
