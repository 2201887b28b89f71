"""glowfast: fast, exact Glow for PyTorch."""

__version__ = "0.1.0"

from .model import BACKENDS, Glow, GlowOutput

__all__ = ["BACKENDS", "Glow", "GlowOutput", "__version__"]
