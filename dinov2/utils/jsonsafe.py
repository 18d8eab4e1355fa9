"""Results as JSON values: numbers, arrays and tensors in nested containers, NaN/inf as ``null``.

One converter for every ``results.json`` the evaluations write (segmentation finetuning, linear
probing): JSON has no NaN, and an undefined metric (a class absent from every case, a split
without positives) is written as ``null``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def json_safe(value: Any) -> Any:
    """``value`` with every part made a JSON value.

    Mappings become dicts with string keys, lists and tuples lists, NumPy arrays and tensors
    (nested) lists, NumPy scalars Python numbers; non-finite floats become ``None``. Anything
    else (strings, ints, bools, None) is returned as it is.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
