"""ml_collections config files: `get_config(variant)` per file, presets shared in presets.py."""
