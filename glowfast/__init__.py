"""glowfast: fast, exact Glow for PyTorch."""

__version__ = "0.1.0"

from .model import BACKENDS, Glow, GlowOutput

__all__ = ["BACKENDS", "Glow", "GlowOutput", "__version__", "load_glow"]


def __getattr__(name: str):
    # glowfast.load_glow lives in glowfast.sample, imported on first use: importing it here would make
    # `python -m glowfast.sample` warn that the module was already imported before it ran
    if name == "load_glow":
        from .sample import load_glow

        return load_glow
    raise AttributeError(f"module 'glowfast' has no attribute {name!r}")
