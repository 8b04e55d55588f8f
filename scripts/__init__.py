"""Thin entry points over fedrun (not installed with the package): run from the repository root,
e.g. ``python -m scripts.privacy_report --quick``."""
