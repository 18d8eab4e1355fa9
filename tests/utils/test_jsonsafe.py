"""JSON-safe results (dinov2/utils/jsonsafe.py): NaN/inf as null, arrays and tensors as lists."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from dinov2.utils.jsonsafe import json_safe


def test_undefined_metrics_become_null_and_containers_plain():
    value = {"dice": np.array([0.5, np.nan]), 3: (np.float32(1.5), np.int64(2), math.inf, -math.inf),
             "t": torch.tensor([[1, 2]]), "ok": [np.bool_(True), "x", None, 7]}
    safe = json_safe(value)
    assert safe == {"dice": [0.5, None], "3": [1.5, 2, None, None], "t": [[1, 2]], "ok": [True, "x", None, 7]}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
