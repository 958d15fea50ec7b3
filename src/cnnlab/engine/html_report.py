"""HTML reports of run folders: one self-contained page per run, and one page comparing runs.

Everything a page shows is read back from the run folder (config.json, metrics.csv, results.json,
last.json and the PNGs), so a report can be written for a finished run, for a run still training and
for one that was interrupted. PNGs are embedded as base64 data URIs and the CSS is inline: the file
stands alone (mail it, archive it), needs no JavaScript and no network.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text
from cnnlab._plot import pyplot
from cnnlab.engine.report import METRIC_COLUMNS, confusion_figure, curves_figure

EXPECTED = "a run folder written by `cnnlab train` (config.json, then metrics.csv and last.json after each epoch)"

# the PNGs a finished run leaves, with what a reader should look for in each
PLOTS = (
    ("curves.png", "Learning curves", "Loss and accuracy per epoch, training against validation. A validation curve "
     "that turns up while the training curve keeps falling means over-fitting; both high and flat, under-fitting."),
    ("confusion_matrix.png", "Confusion matrix", "Test split: rows are the true classes, columns the predictions; "
     "colours are row-normalised (recall on the diagonal), the numbers are counts."),
    ("misclassified.png", "Misclassified test images", "The first misclassified test images, titled true -> predicted."),
)

COLUMN_TITLES = {"time_s": "time", "cpu_s": "CPU time", "images_per_s": "images/s", "lr": "learning rate"}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; } .note { color: #666; font-size: .9em; }
.status { padding: .5em .8em; border-radius: 4px; } .done { background: #e8f5e9; } .open { background: #fff3e0; }
table { border-collapse: collapse; margin: .5em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mark td { font-weight: bold; background: #f1f8e9; }  /* best epoch, changed setting */
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; } code { background: #f5f5f5; padding: 0 .2em; }
footer { margin-top: 3em; color: #888; font-size: .85em; }
"""


@dataclass
class RunFolder:
    """What a run folder holds, read once.

    Args:
        path: the folder; config: config.json; history: one dict per finished epoch (metrics.csv, else last.json);
        results: results.json (None while training or after an interruption); meta: last.json ({} before epoch 1).
    """

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    results: dict[str, Any] | None
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def model(self) -> str:
        return str(self.meta.get("model") or self.config.get("model", {}).get("name", "?"))

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("name", "?"))

    @property
    def finished(self) -> bool:
        """results.json exists and covers every epoch (a resumed run trains past an old results.json)."""
        return self.results is not None and self.results.get("epochs_run", 0) >= len(self.history)

    def column(self, key: str) -> list[float | None]:
        return [row.get(key) for row in self.history]

    @property
    def best_val_acc(self) -> float | None:
        values = [v for v in self.column("val_acc") if v is not None]
        return max(values) if values else None

    @property
    def images_per_s(self) -> float | None:
        values = [v for v in self.column("images_per_s") if v]
        return sum(values) / len(values) if values else None


def read_run(run_dir: str | os.PathLike) -> RunFolder:
    """Read a run folder; anything that is not one (or is damaged) raises a CnnlabError naming the folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CnnlabError(f"{path} is not a folder; expected {EXPECTED}")
    if not (path / "config.json").is_file():
        hint = ""
        if any((p / "config.json").is_file() for p in path.iterdir() if p.is_dir()):
            hint = f"; it holds run folders: pass them (cnnlab report {path}/A {path}/B) to compare them"
        raise CnnlabError(f"{path} has no config.json, so it is not a run folder; expected {EXPECTED}{hint}")
    config = _read_json(path / "config.json")
    meta = _read_json(path / "last.json") if (path / "last.json").is_file() else {}
    results = _read_json(path / "results.json") if (path / "results.json").is_file() else None
    history = _read_metrics(path / "metrics.csv") if (path / "metrics.csv").is_file() else list(meta.get("history", []))
    return RunFolder(path, config, history, results, meta)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CnnlabError(f"{path} cannot be read as JSON ({e}); the run folder {path.parent} is damaged") from None
    if not isinstance(data, dict):
        raise CnnlabError(f"{path} holds a {type(data).__name__}, expected a JSON object; the run folder is damaged")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    damaged = f"{path} is damaged; expected the CSV `cnnlab train` writes (a header with epoch, then one row per epoch)"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None and "epoch" not in reader.fieldnames:
                raise CnnlabError(f"{damaged}; its header is {','.join(reader.fieldnames)[:60]!r}")
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append({k: (None if v in ("", None) else int(v) if k == "epoch" else float(v))
                                 for k, v in row.items() if k in METRIC_COLUMNS})
                except (ValueError, TypeError):
                    raise CnnlabError(f"{path} line {line} is not a metrics row (numbers in columns "
                                      f"{', '.join(METRIC_COLUMNS)})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise CnnlabError(f"{damaged} ({type(e).__name__}: {e})") from None
    return rows


# ---------------------------------------------------------------- formatting


def _num(value: Any, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f} ({value:.2%})"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[bool] = (), *,
           table_id: str = "", row_classes: Sequence[str] = ()) -> str:
    """An escaped HTML table (no header row for ``header=None``); ``numeric[i]`` right-aligns column i."""
    head = "<thead><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr></thead>" if header else ""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(f'<td{" class=num" if j < len(numeric) and numeric[j] else ""}>{escape(str(v))}</td>'
                        for j, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}>{head}<tbody>{''.join(body)}</tbody></table>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return buf.getvalue()


def _figure(png: bytes, title: str, caption: str) -> str:
    return (f'<figure><img src="{_png_uri(png)}" alt="{escape(title)}"><figcaption><b>{escape(title)}.</b> '
            f"{escape(caption)}</figcaption></figure>")


def _page(title: str, body: Sequence[str]) -> str:
    import cnnlab

    footer = f"Written by cnnlab {escape(cnnlab.__version__)} on {datetime.now():%Y-%m-%d %H:%M}."
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + f"\n<footer>{footer}</footer>\n</body></html>\n")


# ---------------------------------------------------------------- one run


def _status(run: RunFolder) -> str:
    planned = run.config.get("epochs")
    of = f" of {planned} planned" if planned else ""
    if run.finished:
        return f'<p class="status done">Finished: {len(run.history)} epoch(s){escape(of)}, tested on the test split.</p>'
    where = f"after epoch {len(run.history)}{of}" if run.history else "before its first epoch ended"
    stale = " (results.json is from an earlier finish; training was resumed since)" if run.results else ""
    return (f'<p class="status open">Run in progress or interrupted {escape(where)}{escape(stale)}. '
            "The test-split numbers, confusion matrix and misclassified images come when it finishes; "
            f"resume it with <code>cnnlab train --resume {escape(shlex.quote(str(run.path)))}</code>.</p>")


def _headline(run: RunFolder) -> str:
    res, last = run.results if run.finished else None, run.history[-1] if run.history else {}
    rows: list[tuple[str, str]] = []
    if res is not None:
        rows.append(("test accuracy", _pct(res.get("test_accuracy"))))
        rows += [(f"test top-{k} accuracy", _pct(v)) for k, v in (res.get("test_topk") or {}).items()]
        rows.append(("test loss", _num(res.get("test_loss"))))
    else:
        rows.append(("last training loss / accuracy", f"{_num(last.get('train_loss'))} / {_pct(last.get('train_acc'))}"))
        if last.get("val_acc") is not None:
            rows.append(("last validation loss / accuracy", f"{_num(last.get('val_loss'))} / {_pct(last['val_acc'])}"))
    has_val = run.best_val_acc is not None
    monitor = run.config.get("monitor", "val_loss") if has_val else "train_loss"
    best = res.get("best_epoch") if res else run.meta.get("best_epoch")
    tested = "; the model tested" if res and has_val else ""  # without validation the last epoch is tested
    rows.append(("best epoch", f"{best or '–'} (by {monitor}{tested})"))
    rows.append(("best validation accuracy", _pct(run.best_val_acc)) if run.best_val_acc is not None
                else ("validation", "none (data.val_fraction = 0): the last epoch's model is the one tested"))
    rows.append(("epochs run / planned", f"{len(run.history)} / {run.config.get('epochs', '?')}"))
    if res is not None:
        rows.append(("stopped early", "yes (patience {})".format(run.config.get("patience")) if res.get("stopped_early")
                     else "no"))
        rows.append(("wall time (CPU time)", f"{duration(res.get('wall_s'))} ({duration(res.get('cpu_s'))})"))
    else:
        rows.append(("training time so far", duration(sum(v or 0 for v in run.column("time_s")))))
    rows.append(("training speed", f"{run.images_per_s:,.0f} images/s (mean over epochs)" if run.images_per_s else "–"))
    return '<section id="summary"><h2>Summary</h2>' + _table(None, rows) + "</section>"


def _plots(run: RunFolder) -> str:
    parts = []
    for name, title, caption in PLOTS:
        if not run.finished and name != "curves.png":
            continue  # a test evaluation that is not (or no longer) the run's
        png = (run.path / name).read_bytes() if run.finished and (run.path / name).is_file() else None
        if png is None and name == "curves.png" and run.history:
            png = _figure_png(curves_figure(run.history))  # drawn now: no PNG yet, or plots=false
        elif png is None and name == "confusion_matrix.png" and run.results and run.results.get("confusion"):
            import torch

            png = _figure_png(confusion_figure(torch.tensor(run.results["confusion"]), _classes(run)))
        if png is not None:
            parts.append(_figure(png, title, caption))
    if not parts:
        parts.append('<p class="note">No plots yet: no epoch has finished.</p>')
    return '<section id="plots"><h2>Plots</h2>' + "".join(parts) + "</section>"


def _classes(run: RunFolder) -> list[str]:
    return [str(c) for c in (run.results or {}).get("classes") or run.meta.get("classes") or []]


def _per_class(run: RunFolder) -> str:
    res = run.results if run.finished else None
    if not res or not all(k in res for k in ("precision", "recall", "confusion")):
        return ""
    classes, rows = _classes(run), []
    for i, (p, r, counts) in enumerate(zip(res["precision"], res["recall"], res["confusion"])):
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows.append((i, classes[i] if i < len(classes) else str(i), f"{p:.4f}", f"{r:.4f}", f"{f1:.4f}", sum(counts)))
    note = ('<p class="note">Test split. Precision: of the images predicted as the class, the share that are; recall: '
            "of the images of the class, the share found; support: test images of the class.</p>")
    return ('<section id="classes"><h2>Per class</h2>' + note
            + _table(("#", "class", "precision", "recall", "F1", "support"), rows, (True, False, True, True, True, True),
                     table_id="per-class") + "</section>")


def _epochs(run: RunFolder) -> str:
    if not run.history:
        return ""
    formats = {"epoch": "d", "lr": ".3g", "time_s": ".1f", "cpu_s": ".1f", "images_per_s": ",.0f"}
    rows = [[_num(row.get(k), formats.get(k, ".4f")) for k in METRIC_COLUMNS] for row in run.history]
    best = (run.results or {}).get("best_epoch") or run.meta.get("best_epoch")
    marks = ["mark" if row.get("epoch") == best else "" for row in run.history]
    note = ('<p class="note">One row per epoch (metrics.csv): learning rate at the epoch\'s last step, times in '
            "seconds; the best epoch is in bold.</p>")
    return ('<section id="epochs"><h2>Per epoch</h2>' + note
            + _table([COLUMN_TITLES.get(k, k.replace("_", " ")) for k in METRIC_COLUMNS], rows, [True] * len(METRIC_COLUMNS), table_id="per-epoch", row_classes=marks)
            + "</section>")


def model_size(run: RunFolder) -> tuple[int, int, tuple[int, ...]]:
    """(parameters, MACs per image, input shape) of the run's model, measured on the meta device (no weights)."""
    import torch

    from cnnlab.analysis import summary
    from cnnlab.models import create_model

    if not run.meta:
        raise CnnlabError("no checkpoint yet (last.json), so the input shape is unknown")
    shape = tuple(int(s) for s in run.meta["input_shape"])
    options = {k: v for k, v in run.config.get("model", {}).get("options", {}).items() if k != "in_channels"}
    with torch.device("meta"):
        model = create_model(run.meta["model"], num_classes=run.meta["num_classes"], in_channels=shape[0], **options)
    totals = summary(model, shape, device="meta", training_memory=False).totals
    return totals.params, totals.macs, shape


def _model(run: RunFolder) -> str:
    try:
        params, macs, shape = model_size(run)
    except Exception as e:  # noqa: BLE001 - the page is useful without the sizes; it says why they are missing
        text = f"Parameter count and MACs unavailable: {type(e).__name__}: {e}"
        return f'<section id="model"><h2>Model</h2><p class="note">{escape(text)}</p></section>'
    rows = [("model", run.model), ("input shape (C, H, W)", str(shape)), ("classes", len(_classes(run)) or "?"),
            ("parameters", f"{params:,}"), ("MACs per image", f"{macs:,} ({macs / 1e6:,.2f} M)")]
    return '<section id="model"><h2>Model</h2>' + _table(None, rows) + "</section>"


def _flat_config(config: dict[str, Any]) -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}`` (values as JSON, strings bare)."""
    flat = {}
    for key, value in config.items():
        items = value.items() if isinstance(value, dict) and key in ("model", "data", "optim") else [(None, value)]
        for sub, v in items:
            flat[key if sub is None else f"{key}.{sub}"] = v if isinstance(v, str) else json.dumps(v)
    return flat


def _config(run: RunFolder) -> str:
    from cnnlab.engine.config import TrainConfig

    defaults = _flat_config(TrainConfig().to_dict())
    flat = _flat_config(run.config)
    marks = ["mark" if defaults.get(k) != v else "" for k, v in flat.items()]
    note = ('<p class="note">config.json (rerun with <code>cnnlab train --config config.json</code>); '
            "values that differ from the defaults are in bold.</p>")
    return ('<section id="config"><h2>Configuration</h2>' + note
            + _table(("key", "value"), list(flat.items()), row_classes=marks) + "</section>")


def write_html_report(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write one self-contained HTML page about ``run_dir`` (default ``run_dir/report.html``); returns its path."""
    run = read_run(run_dir)
    path = Path(path) if path is not None else run.path / "report.html"
    header = (f"<header><h1>{escape(run.name)} <small>· {escape(run.model)}</small></h1>"
              f'<p class="sub">dataset {escape(run.dataset)} · folder <code>{escape(str(run.path))}</code></p>'
              + _status(run) + "</header>")
    body = [header, _headline(run), _plots(run), _per_class(run), _epochs(run), _model(run), _config(run)]
    text = _page(f"{run.name} – {run.model} · cnnlab report", [b for b in body if b])
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


# ---------------------------------------------------------------- several runs


def _mathtext_safe(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib reads $...$ in labels as maths


def comparison_figure(runs: Sequence[RunFolder]):
    """Loss and accuracy per epoch of every run: validation solid, training dashed, one colour per run."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour, epochs, label = colours[i % len(colours)], [r["epoch"] for r in run.history], _mathtext_safe(run.name)
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            val = run.column(f"val_{key}")
            ax.plot(epochs, run.column(f"train_{key}"), "--", color=colour, alpha=0.6,
                    label=f"{label} (train)" if key == "loss" else None)
            if any(v is not None for v in val):
                ax.plot(epochs, val, "o-", color=colour, markersize=3, label=f"{label} (val)" if key == "loss" else None)
    ax_loss.set_yscale("log")  # one diverging run would otherwise flatten all the others
    for ax, title in ((ax_loss, "loss (log scale)"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)  # one legend for both panels, beside them
    return fig


def write_comparison_report(run_dirs: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Write one HTML page comparing ``run_dirs``: a table of their results and their overlaid learning curves."""
    if not run_dirs:
        raise CnnlabError("no run folders to compare; give at least one")
    runs = [read_run(d) for d in run_dirs]
    rows = []
    for run in runs:
        res = run.results if run.finished else None
        last_train = run.history[-1].get("train_acc") if run.history else None
        rows.append((run.name, run.model, run.dataset, f"{len(run.history)} / {run.config.get('epochs', '?')}",
                     _pct(res.get("test_accuracy")) if res else "–", _pct(run.best_val_acc), _pct(last_train),
                     duration(res.get("wall_s")) if res else "–", "finished" if res else "in progress or interrupted"))
    table = _table(("run", "model", "dataset", "epochs run / planned", "test accuracy", "best val accuracy",
                    "last train accuracy", "wall time", "status"), rows,
                   (False, False, False, True, True, True, True, True, False), table_id="runs")
    note = ('<p class="note">Test accuracy is that of the model tested (best epoch by validation, else the last); '
            "last train accuracy far above best val accuracy means over-fitting.</p>")
    plotted = [run for run in runs if run.history]
    curves = (_figure(_figure_png(comparison_figure(plotted)), "Learning curves",
                      "Solid: validation, dashed: training, one colour per run. Training far better than validation "
                      "means over-fitting; both poor and flat, under-fitting.") if plotted
              else '<p class="note">No run has finished an epoch yet.</p>')
    body = [f"<header><h1>Comparison of {len(runs)} runs</h1>"
            f'<p class="sub">{escape(", ".join(str(r.path) for r in runs))}</p></header>',
            f'<section id="overview"><h2>Runs</h2>{note}{table}</section>', f'<section id="curves"><h2>Curves</h2>{curves}</section>']
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, _page(f"cnnlab comparison of {len(runs)} runs", body))
