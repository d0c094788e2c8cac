"""The version of transferlab (what exported model folders record)."""

__version__ = "0.1.0"
