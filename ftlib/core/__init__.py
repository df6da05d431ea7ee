"""Layer 1, core: configuration, data formats, atomic writes, safety checks, model loading, lineage
records and tracking setup. Imports nothing from the layers above (tests/test_architecture.py)."""
