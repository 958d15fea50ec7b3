"""HTML run reports and the comparison page (engine/html_report.py) and `cnnlab report`, on one real tiny run."""
from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser

import pytest
from markupsafe import escape  # what Jinja2's autoescape writes (&#34; for a double quote)

from cnnlab._errors import CnnlabError
from cnnlab.cli.main import main
from cnnlab.data import datasets as D
from cnnlab.engine import train
from cnnlab.engine.html_report import write_comparison_report, write_html_report
from tests.engine._tiny import make_tiny, tiny_config

RUN_NAME = 'r<b>&"1'  # characters that break HTML unless escaped
ODD_CLASS = "<i>&co"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Parses a page strictly enough to catch broken markup: every non-void tag must be closed in order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.rows: dict[str, int] = {}  # table id -> rows in its tbody
        self.text: list[str] = []
        self._table: list[str] = []
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(attrs["src"])
        if tag == "table":
            self._table.append(attrs.get("id", ""))
        if tag == "tr" and "tbody" in self.stack:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "table":
            self._table.pop()

    def handle_data(self, data):
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


def png_bytes(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,")
    return base64.b64decode(src.split(",", 1)[1], validate=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 2-epoch run with a validation split, plots, an odd run name and an odd class name (~2 s)."""
    def odd_tiny(root=None, download=False):
        data = make_tiny()
        data.classes = ["tl", ODD_CLASS, "br"]
        return data

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(D.DATASETS, "tiny", odd_tiny)
        config = tiny_config(tmp_path_factory.mktemp("runs"), name=RUN_NAME, epochs=2)
        config.plots, config.data.val_fraction = True, 0.25
        return train(config).run_dir


def interrupted_copy(run, dest, *remove):
    shutil.copytree(run, dest)
    for name in ("results.json", "report.html") + remove:
        (dest / name).unlink(missing_ok=True)
    return dest


def test_report_of_a_finished_run(run):
    path = write_html_report(run)
    assert path == run / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    results = json.loads((run / "results.json").read_text())
    assert f"{results['test_accuracy']:.4f}" in page.all_text
    assert "Finished: 2 epoch(s) of 2 planned" in page.all_text
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert {"curves.png", "confusion_matrix.png"} <= set(pngs)
    assert len(page.imgs) == len(pngs)  # one <img> per PNG of the folder
    embedded = [png_bytes(src) for src in page.imgs]
    assert all(b.startswith(PNG_SIGNATURE) for b in embedded)
    assert sorted(embedded) == sorted((run / name).read_bytes() for name in pngs)  # the files themselves
    assert page.rows["per-class"] == 3 and page.rows["per-epoch"] == 2
    support = [sum(row) for row in results["confusion"]]
    assert sum(support) == 30
    # escaped everywhere: the raw strings never reach the markup, the text reads them back
    assert RUN_NAME not in text and escape(RUN_NAME) in text and RUN_NAME in page.all_text
    assert ODD_CLASS not in text and ODD_CLASS in page.all_text and "i" not in page.tags
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")  # self-contained


def test_model_size_matches_the_trained_model(run):
    from cnnlab.engine.runs import load_run

    params = sum(p.numel() for p in load_run(run).model.parameters())
    text = Page(write_html_report(run).read_text()).all_text
    assert f"{params:,}" in text and "MACs per image" in text


def test_report_of_an_interrupted_run(run, tmp_path):
    stopped = interrupted_copy(run, tmp_path / "stopped")
    page = Page(write_html_report(stopped).read_text())
    assert "interrupted after epoch 2 of 2 planned" in page.all_text
    assert len(page.imgs) == 1 and png_bytes(page.imgs[0]).startswith(PNG_SIGNATURE)  # curves only, drawn from metrics
    assert "per-class" not in page.rows and page.rows["per-epoch"] == 2
    # a finished run resumed for more epochs: its results.json is older than its metrics
    results = json.loads((run / "results.json").read_text())
    (stopped / "results.json").write_text(json.dumps(dict(results, epochs_run=1)))
    page = Page(write_html_report(stopped).read_text())
    assert "interrupted after epoch 2" in page.all_text and "results.json is from an earlier finish" in page.all_text
    assert "test accuracy" not in page.all_text and "per-class" not in page.rows  # no stale test numbers
    (stopped / "results.json").unlink()
    # without metrics.csv the history comes from last.json
    (stopped / "metrics.csv").unlink()
    page = Page(write_html_report(stopped).read_text())
    assert "interrupted after epoch 2" in page.all_text and page.rows["per-epoch"] == 2


def test_report_before_the_first_epoch(run, tmp_path):
    (tmp_path / "new").mkdir()
    shutil.copy(run / "config.json", tmp_path / "new")
    page = Page(write_html_report(tmp_path / "new").read_text())
    assert "before its first epoch ended" in page.all_text and "No plots yet" in page.all_text
    assert "Parameter count and MACs unavailable" in page.all_text and not page.imgs


def test_comparison_page(run, tmp_path):
    other = interrupted_copy(run, tmp_path / "other")
    path = write_comparison_report([run, other], tmp_path / "out" / "compare.html")
    text = path.read_text()
    page = Page(text)
    assert page.rows["runs"] == 2 and len(page.imgs) == 1 and png_bytes(page.imgs[0]).startswith(PNG_SIGNATURE)
    results = json.loads((run / "results.json").read_text())
    assert f"{results['test_accuracy']:.4f}" in page.all_text
    assert "in progress or interrupted" in page.all_text and RUN_NAME not in text and RUN_NAME in page.all_text
    with pytest.raises(CnnlabError, match="at least one"):
        write_comparison_report([], tmp_path / "x.html")


def test_cli(run, tmp_path, capsys):
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    other = interrupted_copy(run, tmp_path / "other")
    out = tmp_path / "c.html"
    assert main(["report", str(run), str(other), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and Page(out.read_text()).rows["runs"] == 2


def test_errors_name_the_folder_and_what_is_expected(run, tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing is not a folder" in err and "config.json" in err
    shutil.copytree(run, tmp_path / "runs" / "a")
    assert main(["report", str(tmp_path / "runs")]) == 2  # the parent of runs, not a run
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs'} has no config.json" in err and "pass them" in err
    (tmp_path / "runs" / "a" / "results.json").write_text("{")
    with pytest.raises(CnnlabError, match=r"results.json cannot be read as JSON.*damaged"):
        write_html_report(tmp_path / "runs" / "a")


# ---------------------------------------------------------------- task-generic page


def reconstruction_copy(run, dest):
    """A copy of the run rewritten as another task would leave it: its own metrics.csv columns and test_metrics."""
    shutil.copytree(run, dest)
    for name in ("report.html", "confusion_matrix.png", "misclassified.png", "curves.png"):
        (dest / name).unlink(missing_ok=True)
    (dest / "metrics.csv").write_text("epoch,train_loss,train_psnr,val_loss,val_psnr,lr,time_s\n"
                                      "1,0.05,14.25,0.04,15.5,0.1,2.0\n2,0.03,17.75,0.035,16.125,0.05,2.0\n")
    results = json.loads((run / "results.json").read_text())
    (dest / "results.json").write_text(json.dumps({
        "task": "reconstruction-test", "test_metrics": {"psnr": 16.0625, "loss": 0.0375}, "best_epoch": 2,
        "epochs_run": 2, "stopped_early": False, "wall_s": 4.0, "cpu_s": 4.0, "confusion": results["confusion"]}))
    return dest


def test_a_task_brings_its_own_sections_and_metrics(run, tmp_path, monkeypatch):
    from cnnlab.engine import html_report as H

    folder = reconstruction_copy(run, tmp_path / "recon")
    seen = []

    def sections(run_dir, results):
        seen.append((run_dir, results))
        return [H.ReportSection("Reconstructions <x>", "inputs & outputs", table=[{"image": "a", "psnr": 16.0625}],
                                images=[run / "confusion_matrix.png", run_dir / "not-drawn.png"])]

    monkeypatch.setitem(H._SECTIONS, "reconstruction-test", sections)
    text = write_html_report(folder).read_text()
    page = Page(text)
    assert seen == [(folder, json.loads((folder / "results.json").read_text()))]
    assert "test PSNR (dB) 16.0625" in page.all_text and "test loss 0.0375" in page.all_text
    assert "test accuracy" not in page.all_text and "per-class" not in page.rows  # no classification parts
    assert "best validation PSNR (dB) 16.1250" in page.all_text  # the higher val_psnr is the better one
    assert page.rows["per-epoch"] == 2 and "val psnr" in page.all_text and "images/s" not in page.all_text
    assert page.rows["reconstructions-x"] == 1 and "Reconstructions <x>" in page.all_text and "<x>" not in text
    assert len(page.imgs) == 2  # the curves drawn from metrics.csv, the section's existing PNG; no missing one
    assert png_bytes(page.imgs[1]) == (run / "confusion_matrix.png").read_bytes()

    # sections passed in replace the registered ones; an unknown task says so instead of failing
    page = Page(write_html_report(folder, sections=[H.ReportSection("Only this")]).read_text())
    assert "Only this" in page.all_text and "Reconstructions" not in page.all_text
    monkeypatch.delitem(H._SECTIONS, "reconstruction-test")
    page = Page(write_html_report(folder).read_text())
    assert "No report sections are registered for task 'reconstruction-test'" in page.all_text


def test_sections_of_an_unfinished_run_get_no_results(run, tmp_path, monkeypatch):
    from cnnlab.engine import html_report as H

    stopped = interrupted_copy(run, tmp_path / "stopped")
    seen = []
    monkeypatch.setitem(H._SECTIONS, "classification", lambda run_dir, results: seen.append(results) or [])
    write_html_report(stopped)
    assert seen == [{}]  # no stale test numbers reach a task's sections


def test_register_report_sections_refuses_a_second_function():
    from cnnlab.engine import html_report as H

    H.register_report_sections("classification", H.classification_sections)  # the same again: fine
    with pytest.raises(CnnlabError, match="already registered.*replace=True"):
        H.register_report_sections("classification", lambda run_dir, results: [])
    with pytest.raises(CnnlabError, match="task_name must be a non-empty string"):
        H.register_report_sections("", H.classification_sections)


def test_curves_have_one_panel_per_metric_and_skip_missing_values():
    from cnnlab.engine.report import curves_figure

    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": None, "train_psnr": 10.0, "val_psnr": None, "lr": 0.1},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.7, "train_psnr": 12.0, "val_psnr": 11.0, "lr": 0.1,
                "val_miou": 0.25}]
    fig = curves_figure(history)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "PSNR (dB)", "mIoU"]
    lines = {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in fig.axes for line in ax.lines}
    assert lines == {("loss", "train"): ([1, 2], [1.0, 0.5]), ("loss", "validation"): ([2], [0.7]),
                     ("PSNR (dB)", "train"): ([1, 2], [10.0, 12.0]), ("PSNR (dB)", "validation"): ([2], [11.0]),
                     ("mIoU", "validation"): ([2], [0.25])}
    from cnnlab._plot import pyplot

    pyplot().close(fig)


def test_comparison_uses_each_runs_metrics(run, tmp_path):
    folder = reconstruction_copy(run, tmp_path / "recon")
    page = Page(write_comparison_report([run, folder], tmp_path / "c.html").read_text())
    results = json.loads((run / "results.json").read_text())
    text = page.all_text
    assert "test accuracy" in text and "test PSNR (dB)" in text and "best val PSNR (dB)" in text
    assert f"{results['test_accuracy']:.4f}" in text and "16.0625" in text and "16.1250" in text
