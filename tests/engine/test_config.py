"""Typed config overrides: types checked, unknown keys rejected with a suggestion, JSON round trip."""
from __future__ import annotations

import json

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.engine.config import TrainConfig, apply_overrides


def test_overrides_parse_each_type():
    c = apply_overrides(TrainConfig(), ["optim.lr=0.1", "epochs=3", "data.flip=true", "model.weights=none",
                                        "data.scale=0.9,1.1", "model.freeze=stem,stages.0",
                                        "model.lr_mult={\"fc\": 10}", "model.options={\"drop_rate\": 0.3}", "name=x"])
    assert c.optim.lr == 0.1 and c.epochs == 3 and c.data.flip is True and c.model.weights is None
    assert c.data.scale == (0.9, 1.1) and c.model.freeze == ["stem", "stages.0"]
    assert c.model.lr_mult == {"fc": 10.0} and c.model.options == {"drop_rate": 0.3} and c.name == "x"


@pytest.mark.parametrize("item, message", [
    ("optim.lrr=0.1", "did you mean optim.lr"),
    ("lr=0.1", "did you mean optim.lr"),
    ("epochs=three", "epochs: cannot read 'three' as int"),
    ("epochs=2.5", "as int"),
    ("data.flip=maybe", "as bool"),
    ("optim.optimizer=adamm", "did you mean adam"),
    ("optim.lr", "key=value"),
    ("patience=3", "needs a validation split"),
    ("data.batch_size=0", "must be positive"),
])
def test_bad_overrides_are_clear(item, message):
    with pytest.raises(CnnlabError, match=message):
        apply_overrides(TrainConfig(), [item])


def test_json_roundtrip():
    c = apply_overrides(TrainConfig(), ["optim.lr=0.3", "data.scale=0.8,1.2", "model.freeze=a", "data.root=/x"])
    back = TrainConfig.from_dict(json.loads(c.to_json()))
    assert back == c
    assert "optim.lr = 0.3" in c.describe()


def test_dict_fields_take_one_entry_at_a_time():
    from cnnlab.engine.config import TrainConfig, apply_overrides

    config = apply_overrides(TrainConfig(), ["model.options.backbone=resnet18", "model.options.fpn=false",
                                             "model.options.min_size=128", "model.lr_mult.stages.0=0.1"])
    assert config.model.options == {"backbone": "resnet18", "fpn": False, "min_size": 128}
    assert config.model.lr_mult == {"stages.0": 0.1}
    with pytest.raises(CnnlabError):
        apply_overrides(TrainConfig(), ["model.lr_mult.fc=abc"])  # a multiplier is a number
