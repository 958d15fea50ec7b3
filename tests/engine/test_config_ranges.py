"""Config values no run can use are refused when set (engine/config.py validate), not mid-run."""
from __future__ import annotations

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.engine.config import TrainConfig, apply_overrides


@pytest.mark.parametrize("override, words", [
    ("threads=-1", "threads must be >= 0"),
    ("patience=-1", "patience must be >= 0"),
    ("data.crop_padding=-2", "data.crop_padding must be >= 0"),
    ("data.train_limit=-5", "data.train_limit must be >= 0"),
    ("data.mixup=-1", "data.mixup must be >= 0"),
    ("optim.momentum=-1", "optim.momentum must be >= 0"),
    ("optim.label_smoothing=1.5", "optim.label_smoothing must be in [0, 1]"),
    ("optim.ema_decay=1.5", "optim.ema_decay must be in [0, 1)"),
    ("optim.onecycle_pct=2", "optim.onecycle_pct must be in (0, 1)"),
    ("optim.betas=[1.5,0.9]", "optim.betas must both be in [0, 1)"),
    ("optim.step_epochs=0", "optim.step_epochs >= 1"),
    ("data.scale=[2,1]", "0 < low <= high"),
])
def test_out_of_range_values_are_refused(override, words):
    with pytest.raises(CnnlabError) as e:
        apply_overrides(TrainConfig(), [override])
    assert words in str(e.value)


def test_wrong_argument_types():
    with pytest.raises(CnnlabError, match="list of 'key=value' strings.*got str"):
        apply_overrides(TrainConfig(), "optim.lr=0.1")
    with pytest.raises(CnnlabError, match="key=value"):
        apply_overrides(TrainConfig(), [3])
    with pytest.raises(CnnlabError, match="dict of config keys.*got list"):
        TrainConfig.from_dict([1, 2])


def test_the_defaults_and_zero_meaning_off_still_pass():
    apply_overrides(TrainConfig(), ["data.mixup=0", "optim.ema_decay=0.999", "data.image_size=32", "threads=0"])


def test_negative_lr_mult_and_unquoted_lists():
    with pytest.raises(CnnlabError, match="model.lr_mult values must be >= 0"):
        apply_overrides(TrainConfig(), ['model.lr_mult={"stages": -1}'])
    assert apply_overrides(TrainConfig(), ["model.freeze=[stem,stages.0]"]).model.freeze == ["stem", "stages.0"]
