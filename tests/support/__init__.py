"""Test scaffolding: tiny random checkpoints of every model family, synthetic datasets, the soak
harness and the pixel oracles that check the box-to-token mapping against the real processors.

Importable as ``support`` from the tests (``pythonpath`` in ``pyproject.toml``); the package never
imports it.
"""
