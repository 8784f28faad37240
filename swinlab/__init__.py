"""swinlab: a Lightning-based research template for the Swin Transformer."""

__version__ = "0.1.0"
