"""DP algorithms for in-context learning: accounting, mechanisms, few-shot generation, PE, DP-SGD.

This package has no web code and is usable as a library on its own.
"""

__version__ = "0.1.0"
