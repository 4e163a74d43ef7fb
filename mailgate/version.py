"""mailgate's version: one definition, read by the package, the metrics and setup.cfg."""

__version__ = "0.1.0"
