"""Wiretrail: keep every packet, turn traffic into sessions and records, find threats."""

__version__ = "0.1.0"
