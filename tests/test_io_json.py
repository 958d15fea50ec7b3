"""``_io.dumps_json``: what cnnlab writes as JSON is valid JSON even when a number is NaN or infinite."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cnnlab._io import dumps_json


def _strict(text: str):
    """Parse as a strict JSON reader (jq, browsers) does: the bare words NaN/Infinity are errors."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_null_everywhere():
    obj = {"loss": math.nan, "best": math.inf, "worst": -math.inf, "ok": 0.5, "n": 3, "flag": True, "none": None,
           "history": [{"val_loss": math.nan, "acc": 0.9}], "shape": (1, math.inf), "np": np.float64("nan")}
    with pytest.raises(ValueError):  # what json.dumps alone writes
        _strict(json.dumps(obj))
    text = dumps_json(obj, indent=2)
    assert _strict(text) == {"loss": None, "best": None, "worst": None, "ok": 0.5, "n": 3, "flag": True,
                             "none": None, "history": [{"val_loss": None, "acc": 0.9}], "shape": [1, None], "np": None}
    json.dumps(_strict(text), allow_nan=False)  # the parsed result holds no NaN either


def test_keyword_arguments_pass_through_and_default_results_are_cleaned():
    class Odd:
        pass

    text = dumps_json({"b": 1, "a": Odd()}, sort_keys=True, default=lambda o: [math.nan, 2.0])
    assert text == '{"a": [null, 2.0], "b": 1}'
    assert dumps_json([1.5, -0.0]) == json.dumps([1.5, -0.0])  # finite values are written exactly as json does
    with pytest.raises(TypeError):  # an object nothing can write still fails as in json
        dumps_json({"a": Odd()})
