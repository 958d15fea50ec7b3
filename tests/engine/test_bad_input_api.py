"""Bad input refused by the core (_io.atomic_write, registry.create_model, trainer.train), not deep in torch."""
from __future__ import annotations

import pytest

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text
from tests.engine._tiny import register_tiny, tiny_config


def test_atomic_write_to_a_folder_or_under_a_missing_one(tmp_path):
    with pytest.raises(CnnlabError, match="it is a folder"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(CnnlabError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_create_model_wrong_name_type_and_option_values():
    with pytest.raises(CnnlabError, match="model name must be a string.*NoneType"):
        cnnlab.create_model(None)
    with pytest.raises(CnnlabError, match=r"simple_cnn cannot be built with the options \{'drop_rate': 2\}"):
        cnnlab.create_model("simple_cnn", drop_rate=2)


def test_train_refuses_a_dict_a_foreign_folder_and_a_num_classes_option(tmp_path, monkeypatch):
    from cnnlab.engine import train

    register_tiny(monkeypatch)
    with pytest.raises(CnnlabError, match="takes a TrainConfig.*got dict"):
        train({"epochs": 1})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my data")
    with pytest.raises(CnnlabError, match="holds files that are not a run"):
        train(tiny_config(tmp_path, name="mine", epochs=1))
    assert (mine / "metrics.csv").read_text() == "my data"
    config = tiny_config(tmp_path, name="nc", epochs=1)
    config.model.options = {"num_classes": 5}
    with pytest.raises(CnnlabError, match="num_classes=5 but data 'tiny' has 3 classes"):
        train(config)
