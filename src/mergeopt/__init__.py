"""mergeopt: search-based optimizer for merging language models."""
__version__ = "0.1.0"
