"""The consensus rules of the D-PoDL chain: an executable specification.

Pure functions over frozen dataclasses. Nothing here does I/O, runs an event loop,
touches a database or picks a device; `tests/test_layers.py` enforces it.
"""
