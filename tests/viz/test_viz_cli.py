"""`cnnlab filters`, `cnnlab featuremaps`, `cnnlab explain`."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli.main import main
from tests.viz._squares import make_squares


def _png(path, image) -> str:
    Image.fromarray(image[0].numpy()).save(path)
    return str(path)


def test_filters_default_is_the_notes_example(tmp_path, capsys):
    out = tmp_path / "filters.png"
    assert main(["filters", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sample:china (427x640)" in text and "sample:flower" in text and "vertical line: mean" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_filters_on_a_file_and_learned_filters(tmp_path, capsys):
    image = tmp_path / "stripes.png"
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[:, 10] = 255
    Image.fromarray(array).save(image)
    assert main(["filters", str(image), "--out", str(tmp_path / "a.png")]) == 0
    # vertical: 3 channels x (7 rows, fewer within 3 rows of the border) on the line: 3 * 128 / 600 pixels = 0.64;
    # horizontal: 3 at every pixel within 3 columns of the line: 3 * 7 * 20 / 600 = 0.70
    assert "vertical line: mean 0.640, max 21.000   horizontal line: mean 0.700, max 3.000" in capsys.readouterr().out
    assert main(["filters", "--learned", "lenet5", "--out", str(tmp_path / "k.png")]) == 0
    assert "6 filters of 1x5x5" in capsys.readouterr().out and (tmp_path / "k.png").is_file()


def test_featuremaps_of_a_model_and_a_run(tmp_path, capsys, squares_run):
    out = tmp_path / "fm.png"
    assert main(["featuremaps", "lenet5", "sample:flower", "--stages", "0,1", "--top", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lenet5 (random weights) on sample:flower at 1x32x32" in text and "stage 1" in text and "stage 2" not in text
    assert out.is_file()
    run_dir = str(_run_dir(squares_run))
    image = _png(tmp_path / "br.png", make_squares().test_images[2])
    assert main(["featuremaps", run_dir, image, "--out", str(out)]) == 0
    assert "squares (last checkpoint" in capsys.readouterr().out  # no validation split: the run stands for `last`


def _run_dir(squares_run):
    run = squares_run[0]
    return run.config.out_dir + "/" + run.config.name


def test_explain_prints_the_prediction_and_writes_the_overlay(tmp_path, capsys, squares_run):
    image = _png(tmp_path / "br.png", make_squares().test_images[2])  # a bottom-right square
    out = tmp_path / "cam.png"
    assert main(["explain", _run_dir(squares_run), image, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "  1. br (" in text and "gradcam for class br (index 2) at layer stages.2 (map 3x3)" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", _run_dir(squares_run), image, "--method", "saliency", "--target", "tl",
                 "--out", str(out)]) == 0
    assert "saliency for class tl (index 0)" in capsys.readouterr().out
    # a colour sample photo is converted to the run's one channel and 24x24
    assert main(["explain", _run_dir(squares_run), "sample:china", "--layer", "stages.1", "--out", str(out)]) == 0
    assert "(1x24x24)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--target", "bottom"], "unknown class 'bottom'"),
    (["--layer", "stages.7"], "unknown layer 'stages.7'; did you mean stages"),
    (["--method", "saliency", "--layer", "stages.1"], "--layer applies to --method gradcam only"),
])
def test_explain_bad_input(tmp_path, capsys, squares_run, args, message):
    image = _png(tmp_path / "x.png", make_squares().test_images[0])
    assert main(["explain", _run_dir(squares_run), image, "--out", str(tmp_path / "x_cam.png")] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x_cam.png").exists()


def test_unknown_model_and_missing_image(tmp_path, capsys):
    assert main(["featuremaps", "resnet19", "sample:china"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["filters", str(tmp_path / "nope.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
