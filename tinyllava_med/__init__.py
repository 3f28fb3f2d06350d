"""TinyLLaVA-Med server: serve, convert, train, quantize and evaluate small medical LLaVA models."""

__version__ = "0.1.0"
