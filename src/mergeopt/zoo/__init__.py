"""The embedded testbed: a synthetic multilingual chat world and a tiny Llama model family trained on it."""

from .build import build_zoo, load_zoo, zoo_dir

__all__ = ["build_zoo", "load_zoo", "zoo_dir"]
