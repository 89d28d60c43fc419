"""ExPLAIND Studio engine: record training, decompose it exactly, store the views."""

__version__ = "0.1.0"
