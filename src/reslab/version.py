"""The package version, in a leaf of its own so that any layer can name it."""

__version__ = "0.1.0"
