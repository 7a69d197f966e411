"""sparkstack: a home inference server."""

__version__ = "0.1.0"
