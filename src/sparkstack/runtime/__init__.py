"""Runtimes start, watch and stop engines: local processes or Docker containers."""

from .base import Engine, LaunchSpec, LogBuffer, Runtime, StartError
from .process import ProcessRuntime

__all__ = ["Engine", "LaunchSpec", "LogBuffer", "ProcessRuntime", "Runtime", "StartError"]
