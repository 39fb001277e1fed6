"""The version of torchlrp (read by the package metadata, the command line and the dataset store's settings)."""

__version__ = "0.1.0"
