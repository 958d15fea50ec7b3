"""Config values no run can use are refused when set (engine/config.py validate), not mid-run."""
from __future__ import annotations

import json
import re

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.engine.config import TrainConfig, apply_overrides, parse_duration, validate


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
    config = apply_overrides(TrainConfig(), ["data.mixup=0", "optim.ema_decay=0.999", "data.image_size=32",
                                             "threads=0", "time_budget=0"])
    assert (config.data.mixup, config.optim.ema_decay, config.data.image_size, config.threads) == (0.0, 0.999, 32, 0)
    assert config.time_budget == 0.0 and config.task == config.loss == "auto"
    validate(TrainConfig())  # the defaults themselves


# NaN passed every range check (`nan <= 0` and `nan < 0` are False) and trained to NaN weights; 'inf' and '1e400'
# (inf as a float) reached int() as an OverflowError traceback.
@pytest.mark.parametrize("override", [
    "optim.lr=nan", "optim.lr=inf", "optim.lr=-inf", "optim.lr=1e400", "optim.weight_decay=nan", "data.rotate=nan",
    "epochs=inf", "epochs=1e400", "epochs=nan", "data.batch_size=inf", "time_budget=inf", "time_budget=nan",
    "optim.betas=[0.9, nan]", "data.scale=[0.5, inf]", 'model.lr_mult={"fc": NaN}',
])
def test_non_finite_numbers_are_refused_when_read(override):
    key = override.split("=")[0]
    with pytest.raises(CnnlabError, match=rf"^{re.escape(key)}: .* is not a finite number; expected a"):
        apply_overrides(TrainConfig(), [override])


def test_non_finite_numbers_are_refused_in_a_config_built_in_python_or_read_from_json():
    config = TrainConfig()
    config.optim.lr = float("nan")
    with pytest.raises(CnnlabError, match=r"optim.lr must hold finite numbers.*nan"):
        validate(config)
    config = TrainConfig()
    config.model.options = {"drop_rate": float("inf")}  # options are free-form: only checked as numbers
    with pytest.raises(CnnlabError, match=r"model.options must hold finite numbers.*inf"):
        validate(config)
    with pytest.raises(CnnlabError, match="optim.lr: 'NaN' is not a finite number"):
        TrainConfig.from_dict({"optim": {"lr": float("nan")}})  # a config.json holding NaN (Python writes it)
    with pytest.raises(CnnlabError, match=r"model.options must hold finite numbers"):
        apply_overrides(TrainConfig(), ['model.options={"drop_rate": NaN}'])


def test_time_budget_task_and_loss_are_checked():
    with pytest.raises(CnnlabError, match=r"time_budget must be >= 0 seconds \(0 = off\), got -1"):
        apply_overrides(TrainConfig(), ["time_budget=-1"])
    assert apply_overrides(TrainConfig(), ["time_budget=240"]).time_budget == 240.0
    for key in ("task", "loss"):
        with pytest.raises(CnnlabError, match=rf"{key} must be a non-empty name"):
            apply_overrides(TrainConfig(), [f"{key}= "])
    assert apply_overrides(TrainConfig(), ["loss=mse"]).loss == "mse"  # which losses fit is the task's business


@pytest.mark.parametrize("name", ["../../x", "../x", "a/b", "/tmp/x", "..", ".", "a\\b", " x", "x "])
def test_a_run_name_is_one_folder_name(name):
    with pytest.raises(CnnlabError, match=r"name .* must be one folder name.*out_dir"):
        apply_overrides(TrainConfig(), [f'name="{name}"'])
    config = TrainConfig()
    config.name = name
    with pytest.raises(CnnlabError, match="must be one folder name"):
        validate(config)


def test_run_names_that_are_fine():
    for name in ("r", "resnet18-cifar10-20260101", "my run", "a.b", "..x"):
        assert apply_overrides(TrainConfig(), [f'name="{name}"']).name == name


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("90s", 90.0), ("4m", 240.0), ("4min", 240.0), ("1h30m", 5400.0), ("1.5h", 5400.0),
    ("0.5", 0.5), (" 2M ", 120.0), ("1h2m3s", 3723.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "0h0m", "-5", "-1m", "nan", "inf", "1e400", "9" * 400, "", "4 m",
                                  "1h30", "m", "abc", "4d", "1.2.3"])
def test_parse_duration_refuses_what_is_no_positive_duration(text):
    with pytest.raises(CnnlabError, match=r"^--time-budget .*expected seconds \(300, 90s\) or with units "
                                          r"\(4m, 1.5h, 1h30m\)"):
        parse_duration(text)


def test_negative_lr_mult_and_unquoted_lists():
    with pytest.raises(CnnlabError, match="model.lr_mult values must be >= 0"):
        apply_overrides(TrainConfig(), ['model.lr_mult={"stages": -1}'])
    assert apply_overrides(TrainConfig(), ["model.freeze=[stem,stages.0]"]).model.freeze == ["stem", "stages.0"]


def test_strings_round_trip_through_config_json():
    # from_dict used to pass json.dumps('r"1') = '"r\\"1"' to the parser, which strips the outer quotes only:
    # the name came back with a backslash (and, now that a name is one folder name, was refused)
    config = TrainConfig(name='r<b>&"1')
    config.model.freeze = ['a"b', "stem"]
    config.data.root = "none"  # a string, not None
    back = TrainConfig.from_dict(json.loads(config.to_json()))
    assert back.to_dict() == config.to_dict()
