"""Wattson's inference runtime: an OpenAI-compatible server that measures every request."""

__version__ = "0.1.0"
