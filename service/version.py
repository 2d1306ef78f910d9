"""The installed package's version, reported by ``/info`` and the OpenAPI schema."""

from importlib import metadata

try:
    VERSION = metadata.version("grerank-rag")
except metadata.PackageNotFoundError:
    VERSION = "0+unknown"
