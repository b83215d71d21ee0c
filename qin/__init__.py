"""qin: Quadratic Interest Network for multimodal CTR prediction."""

__version__ = "0.1.0"
