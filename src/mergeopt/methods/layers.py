"""Per-layer values: a list of numbers is interpolated over the decoder layers (mergekit's
"gradients"); embeddings and other tensors outside the layers take the first value."""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """t in [0, 1]: layer index / (L - 1); 0 for tensors outside the decoder layers."""
    m = _LAYER.search(name)
    if not m or num_layers <= 1:
        return 0.0 if not m else 1.0
    return int(m.group(1)) / (num_layers - 1)


def resolve_value(value: Any, name: str, num_layers: int) -> Any:
    """A scalar passes through; a list of numbers is linearly interpolated at the tensor's layer position."""
    if not isinstance(value, list | tuple):
        return value
    if len(value) == 1:
        return value[0]
    s = layer_position(name, num_layers) * (len(value) - 1)
    i0 = int(s)
    i1 = min(len(value) - 1, i0 + 1)
    f = s - i0
    return (1 - f) * float(value[i0]) + f * float(value[i1])
