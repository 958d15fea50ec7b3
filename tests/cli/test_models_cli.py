"""`cnnlab models`, `cnnlab info` and the CLI's error handling."""
from __future__ import annotations

import subprocess
import sys

import cnnlab
from cnnlab.cli.main import main


def test_models_table(capsys):
    assert main(["models", "simple_*"]) == 0
    out = capsys.readouterr().out
    assert "simple_cnn" in out and "1.41M" in out and "1x28x28" in out and "2 models" in out


def test_models_lists_every_registered_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in cnnlab.list_models():
        assert name in out
    assert f"{len(cnnlab.list_models())} models" in out


def test_models_no_match_is_an_error(capsys):
    assert main(["models", "zzz*"]) == 2
    assert "no model matches 'zzz*'" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info", "simple_cnn"]) == 0
    out = capsys.readouterr().out
    assert "1,413,834" in out and "Géron" in out and "stages.2 (256 ch, /8)" in out and "Conv2d(1, 64" in out


def test_info_unknown_model_suggests(capsys):
    assert main(["info", "simple_cnm"]) == 2
    assert "did you mean simple_cnn" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cnnlab.cli.main", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("models", "info", "demo"):
        assert command in out
