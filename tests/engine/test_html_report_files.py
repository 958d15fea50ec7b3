"""Report sections from the files a command other than training writes (register_file_sections, prune.json)."""
from __future__ import annotations

import json

import pytest

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.engine import html_report as H
from cnnlab.engine import train
from tests.engine._tiny import register_tiny, tiny_config


def _quant_sections(folder):
    data = json.loads((folder / "quant.json").read_text())
    return [H.ReportSection("Quantised", "int8 <numbers>", table=[{"bits": data["bits"], "share": 0.5}],
                            formats={"share": ".1%"})]


@pytest.fixture
def quant(monkeypatch):
    monkeypatch.setitem(H._FILE_SECTIONS, "quant.json", H._FileSections(_quant_sections, "cnnlab quant"))


def test_a_folder_with_only_a_known_file_gets_a_page_without_training_parts(tmp_path, quant):
    (tmp_path / "quant.json").write_text('{"bits": 8}')
    page = H.write_html_report(tmp_path).read_text()
    assert "Written by <code>cnnlab quant</code> (quant.json)" in page
    assert '<section id="quantised">' in page and "int8 &lt;numbers&gt;" in page  # escaped like every value
    assert '<td class="num">8</td><td class="num">50.0%</td>' in page  # the section's own number formats
    for training_part in ("Learning curves", "Per epoch", 'id="summary"', 'id="model"', 'id="config"'):
        assert training_part not in page


def test_a_trained_run_that_holds_a_known_file_keeps_its_training_parts_and_adds_the_section(tmp_path, quant,
                                                                                             monkeypatch):
    register_tiny(monkeypatch)
    run_dir = train(tiny_config(tmp_path, epochs=1)).run_dir
    (run_dir / "quant.json").write_text('{"bits": 4}')
    page = H.write_html_report(run_dir).read_text()
    assert "Written by <code>" not in page and "Learning curves" in page and 'id="per-class"' in page
    assert page.index('id="per-class"') < page.index('id="quantised"') < page.index('id="per-epoch"')


def test_register_file_sections_refuses_bad_names_and_a_second_function(monkeypatch):
    monkeypatch.setattr(H, "_FILE_SECTIONS", dict(H._FILE_SECTIONS))
    H.register_file_sections("prune.json", H._pruning_sections, command="cnnlab prune")  # the same again: fine
    with pytest.raises(CnnlabError, match="already registered"):
        H.register_file_sections("prune.json", _quant_sections, command="cnnlab prune")
    H.register_file_sections("prune.json", _quant_sections, command="x", replace=True)
    for bad in ("", "sub/prune.json", None):
        with pytest.raises(CnnlabError, match="file name without a folder"):
            H.register_file_sections(bad, _quant_sections, command="x")
    with pytest.raises(CnnlabError, match="must be a function"):
        H.register_file_sections("a.json", "not callable", command="x")


@pytest.mark.parametrize("content", ["{not json", '{"rows": []}', '{"amount": 0.5}'])
def test_a_damaged_prune_json_is_named(tmp_path, capsys, content):
    (tmp_path / "prune.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'prune.json'} cannot be read as the prune.json `cnnlab prune` writes" in err
    assert "Traceback" not in err and not (tmp_path / "report.html").exists()


def test_a_folder_that_is_neither_a_run_nor_known_is_still_refused(tmp_path):
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(CnnlabError, match="no config.json, so it is not a run folder"):
        H.write_html_report(tmp_path)


def test_model_size_of_a_run_with_backbone_weights_is_quiet(tmp_path):
    """The report counts a detector whose backbone came from a file on the meta device: the same parameters as
    the real model, and none of torch's per-tensor 'copying ... to a meta parameter' warnings."""
    import warnings

    import torch

    import cnnlab
    from cnnlab.engine.html_report import RunFolder, _parameter_count

    torch.save(cnnlab.create_model("resnet18", num_classes=5).state_dict(), tmp_path / "r18.pt")
    options = {"backbone": "resnet18", "size": 64, "grid_size": 2, "backbone_weights": str(tmp_path / "r18.pt")}
    run = RunFolder(path=tmp_path, config={"model": {"name": "yolov1", "options": options}}, history=[],
                    results=None, meta={"model": "yolov1", "task": "detection", "num_classes": 3,
                                        "input_shape": [3, 64, 64]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = _parameter_count(run)
    from cnnlab.engine.tasks._model import rebuild_model

    real = rebuild_model(run.meta, options)  # on the CPU, the weights read for real
    assert count == sum(p.numel() for p in real.parameters())
    assert not [w for w in caught if "meta parameter" in str(w.message)]
