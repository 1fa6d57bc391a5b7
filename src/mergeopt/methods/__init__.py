"""Merge methods, keyed by name (see `registry.METHODS`). Importing this package registers them all."""

from . import linear, slerp, task_arithmetic  # noqa: F401  (registration side effect)
from .layers import layer_position, resolve_value
from .registry import METHODS, MethodSpec, TensorContext, get_method
from .sparsify import RESCALE_MODES

__all__ = ["METHODS", "MethodSpec", "RESCALE_MODES", "TensorContext", "get_method", "layer_position", "resolve_value"]
