"""Portunus: a port-forwarding appliance for Linux."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("portunus")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+local"
