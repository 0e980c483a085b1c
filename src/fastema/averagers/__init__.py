"""Averagers built on the engine's EMAs: BEMA (the bias-corrected EMA)."""

from .bema import BEMA

__all__ = ["BEMA"]
