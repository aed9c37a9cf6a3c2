"""DP algorithms for in-context learning: accounting, mechanisms, few-shot generation, PE, DP-SGD,
next-token backends (sources/) and the evaluation harness (evaluation/). Importable alone: imports
numpy, torch and other libraries, never proxy or any web code.
"""

__version__ = "0.1.0"
