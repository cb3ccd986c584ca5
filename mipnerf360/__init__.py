"""mip-NeRF 360 in PyTorch, faithful to Google's multinerf (the reference)."""

__version__ = "0.1.0"
