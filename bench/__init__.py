"""Benchmarks of the inference runtime: scripts that print tables, not tests.

``python -m bench`` runs them all (``--quick`` for a fast check that they work); each module's
``main(argv)`` runs one. Results and how to read them are in ``docs/BENCHMARKS.md``.
"""
