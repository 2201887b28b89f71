"""glowfast: fast, exact Glow for PyTorch."""

__version__ = "0.1.0"
