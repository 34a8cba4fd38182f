"""Makes conf/ the package kdlab.conf (pyproject.toml): Hydra's pkg:// search path needs an __init__.py."""
