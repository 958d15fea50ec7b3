"""HTML reports of run folders: one self-contained page per run, and one page comparing runs.

Everything a page shows is read back from the run folder (config.json, metrics.csv, results.json,
last.json and the PNGs), so a report can be written for a finished run, for a run still training and
for one that was interrupted. PNGs are embedded as base64 data URIs and the CSS is inline: the file
stands alone (mail it, archive it), needs no JavaScript and no network.

The page is the same for every task: status, summary (the test metrics), learning curves, the
per-epoch table (whatever columns metrics.csv has), model size and configuration. What only one task
has (classification: per-class table, confusion matrix, misclassified images) comes as a list of
``ReportSection`` from a function registered for the task with ``register_report_sections``.
What a command other than training writes into a folder (``cnnlab prune``'s prune.json) brings its
sections through ``register_file_sections``: any folder that holds the file gets them, and a folder
that holds only such files (no epochs of its own) gets a page without the training parts.
Pages are rendered by Jinja2 with autoescaping on, so no value from a run folder reaches the markup raw.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write_text
from cnnlab._plot import pyplot
from cnnlab.engine.report import METRIC_TITLES, confusion_figure, curve_metrics, curves_figure

EXPECTED = "a run folder written by `cnnlab train` (config.json, then metrics.csv and last.json after each epoch)"
DEFAULT_TASK = "classification"  # results.json without a "task" field predates task-generic runs

CURVES_CAPTION = ("Loss and each metric per epoch, training against validation. A validation curve that turns up "
                  "while the training curve keeps falling means over-fitting; both poor and flat, under-fitting.")
COLUMN_TITLES = {"time_s": "time", "cpu_s": "CPU time", "images_per_s": "images/s", "lr": "learning rate"}
COLUMN_FORMATS = {"epoch": "d", "lr": ".3g", "time_s": ".1f", "cpu_s": ".1f", "images_per_s": ",.0f"}
LOWER_IS_BETTER = ("loss", "mse", "mae", "error", "err")  # metric names (or their parts) where less is better


@dataclass
class ReportSection:
    """One task-specific part of a run's page: a heading, a paragraph, an optional table and images.

    Args:
        title: the heading (its slug is the section's and the table's HTML id: "Per class" -> per-class).
        text: a plain-text paragraph under the heading (what the reader should look for).
        table: rows as dicts with the same keys (the column headers); numbers are right-aligned,
            floats shown to 4 decimals.
        images: PNG files to embed (a path that does not exist is skipped), or PNG bytes drawn in memory.
        formats: a format spec per table column for its numbers (``{"parameters": ",d", "accuracy": ".2%"}``);
            columns not named keep the default.
    """

    title: str
    text: str = ""
    table: list[dict[str, Any]] | None = None
    images: list[Path | bytes] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"


SectionsFn = Callable[[Path, dict[str, Any]], list[ReportSection]]
_SECTIONS: dict[str, SectionsFn] = {}


def register_report_sections(task_name: str, fn: SectionsFn, *, replace: bool = False) -> None:
    """Make ``fn(run_dir, results)`` give the task sections of runs whose results.json says ``"task": task_name``.

    ``results`` is results.json for a finished run and ``{}`` while it trains (or when results.json is older
    than the metrics, after a resume), so a section must not show test-split files then.
    """
    if not isinstance(task_name, str) or not task_name:
        raise CnnlabError(f"task_name must be a non-empty string, got {task_name!r}")
    if not callable(fn):
        raise CnnlabError(f"report sections for task {task_name!r} must be a function (run_dir, results), "
                          f"got {type(fn).__name__}")
    old = _SECTIONS.get(task_name)
    if old is not None and old is not fn and not replace:
        raise CnnlabError(f"report sections for task {task_name!r} are already registered ({old.__qualname__}); "
                          "pass replace=True to replace them")
    _SECTIONS[task_name] = fn


FileSectionsFn = Callable[[Path], list[ReportSection]]


@dataclass(frozen=True)
class _FileSections:
    fn: FileSectionsFn
    command: str  # what writes the file, for the page's status line ("cnnlab prune")


_FILE_SECTIONS: dict[str, _FileSections] = {}


def register_file_sections(filename: str, fn: FileSectionsFn, *, command: str, replace: bool = False) -> None:
    """Make ``fn(folder)`` give sections of every folder that holds ``filename`` (written there by ``command``).

    For the numbers a command other than training writes (``cnnlab prune``'s prune.json): the sections come
    after the task's, in the order registered. A folder with such a file and no training epochs of its own is
    reported as written by ``command``, without the training parts (summary, curves, per-epoch table).
    """
    if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename:
        raise CnnlabError(f"filename must be a file name without a folder (prune.json), got {filename!r}")
    if not callable(fn):
        raise CnnlabError(f"report sections for {filename!r} must be a function (folder), got {type(fn).__name__}")
    old = _FILE_SECTIONS.get(filename)
    if old is not None and old.fn is not fn and not replace:
        raise CnnlabError(f"report sections for {filename!r} are already registered ({old.fn.__qualname__}); "
                          "pass replace=True to replace them")
    _FILE_SECTIONS[filename] = _FileSections(fn, command)


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
    columns: list[str] = field(default_factory=list)  # metrics.csv's header (or the history's keys), in order

    @property
    def name(self) -> str:
        if self.written_by:  # config.json there is the source run's, name included
            return self.path.name
        return str(self.config.get("name") or self.path.name)

    @property
    def model(self) -> str:
        return str(self.meta.get("model") or self.config.get("model", {}).get("name", "?"))

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("name", "?"))

    @property
    def task(self) -> str:
        return str((self.results or {}).get("task") or self.meta.get("task") or DEFAULT_TASK)

    @property
    def known_files(self) -> list[str]:
        """The files with registered sections (``register_file_sections``) that this folder holds."""
        return [name for name in _FILE_SECTIONS if (self.path / name).is_file()]

    @property
    def written_by(self) -> str | None:
        """The command that wrote a folder with no training of its own (no epochs, no last.json), else None."""
        if self.history or self.meta or not self.known_files:
            return None
        return _FILE_SECTIONS[self.known_files[0]].command

    @property
    def finished(self) -> bool:
        """results.json exists and covers every epoch (a resumed run trains past an old results.json)."""
        return self.results is not None and self.results.get("epochs_run", 0) >= len(self.history)

    def column(self, key: str) -> list[float | None]:
        return [row.get(key) for row in self.history]

    @property
    def metrics(self) -> list[str]:
        """The per-epoch metrics (loss first, then acc, psnr, ...: each X of a train_X / val_X column)."""
        return curve_metrics(self.history)

    def best_val(self, name: str) -> float | None:
        values = [v for v in self.column(f"val_{name}") if v is not None]
        return (min(values) if lower_is_better(name) else max(values)) if values else None

    @property
    def has_val(self) -> bool:
        return any(v is not None for row in self.history for k, v in row.items() if k.startswith("val_"))

    @property
    def images_per_s(self) -> float | None:
        values = [v for v in self.column("images_per_s") if v]
        return sum(values) / len(values) if values else None

    @property
    def test_metrics(self) -> dict[str, Any]:
        """Test-split numbers of a finished run: results.json's test_metrics, else its classification fields."""
        res = self.results if self.finished else None
        if not res:
            return {}
        if isinstance(res.get("test_metrics"), dict):
            return dict(res["test_metrics"])
        out: dict[str, Any] = {}
        if "test_accuracy" in res:
            out["accuracy"] = res["test_accuracy"]
        out.update({f"top-{k} accuracy": v for k, v in (res.get("test_topk") or {}).items()})
        if "test_loss" in res:
            out["loss"] = res["test_loss"]
        return out


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of metric ``name`` is better (losses, errors) or a larger one (accuracy, PSNR, mAP)."""
    return any(part in LOWER_IS_BETTER for part in re.split(r"[^a-z0-9]+", name.lower()))


def read_run(run_dir: str | os.PathLike) -> RunFolder:
    """Read a run folder; anything that is not one (or is damaged) raises a CnnlabError naming the folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CnnlabError(f"{path} is not a folder; expected {EXPECTED}")
    derived = any((path / name).is_file() for name in _FILE_SECTIONS)  # e.g. cnnlab prune's NEWRUN of several amounts
    if not (path / "config.json").is_file() and not derived:
        hint = ""
        if any((p / "config.json").is_file() for p in path.iterdir() if p.is_dir()):
            hint = f"; it holds run folders: pass them (cnnlab report {path}/A {path}/B) to compare them"
        raise CnnlabError(f"{path} has no config.json, so it is not a run folder; expected {EXPECTED}{hint}")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    meta = _read_json(path / "last.json") if (path / "last.json").is_file() else {}
    results = _read_json(path / "results.json") if (path / "results.json").is_file() else None
    if (path / "metrics.csv").is_file():
        columns, history = _read_metrics(path / "metrics.csv")
    else:
        history = [row for row in meta.get("history", []) if isinstance(row, dict)]
        columns = list(dict.fromkeys(k for row in history for k in row))
    return RunFolder(path, config, history, results, meta, columns)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CnnlabError(f"{path} cannot be read as JSON ({e}); the run folder {path.parent} is damaged") from None
    if not isinstance(data, dict):
        raise CnnlabError(f"{path} holds a {type(data).__name__}, expected a JSON object; the run folder is damaged")
    return data


def _read_metrics(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(header, rows) of metrics.csv: every column, each a number (``epoch`` an integer) or empty (None)."""
    rows = []
    damaged = f"{path} is damaged; expected the CSV `cnnlab train` writes (a header with epoch, then one row per epoch)"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header and "epoch" not in header:
                raise CnnlabError(f"{damaged}; its header is {','.join(header)[:60]!r}")
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append({k: (None if v in ("", None) else int(v) if k == "epoch" else float(v))
                                 for k, v in row.items() if k in header})
                except (ValueError, TypeError):
                    raise CnnlabError(f"{path} line {line} is not a metrics row (numbers in columns "
                                      f"{', '.join(header)})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise CnnlabError(f"{damaged} ({type(e).__name__}: {e})") from None
    return header, rows


# ---------------------------------------------------------------- formatting (also Jinja filters)


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f} ({value:.2%})"


def _metric(name: str, value: Any) -> str:
    """A metric's value as the page shows it: accuracies also as a percentage, other numbers to 4 decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    return _pct(value) if "acc" in name.lower() and math.isfinite(value) else _num(float(value))


def _cell(value: Any, fmt: str | None = None) -> str:
    if fmt is not None and _is_number(value):
        return _num(value, fmt)
    if isinstance(value, float):
        return _num(value)
    return "–" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _title(name: str) -> str:
    return METRIC_TITLES.get(name, name.replace("_", " "))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- templates

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

# Macros: `table` takes a header (None: no header row) and rows of cells; `numeric` are the indices of
# right-aligned columns; `marks` holds one CSS class (or "") per row.
MACROS = """
{%- macro table(header, rows, numeric=(), id="", marks=()) -%}
<table{% if id %} id="{{ id }}"{% endif %}>
{%- if header %}<thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead>{% endif -%}
<tbody>
{%- for row in rows %}
{%- set mark = marks[loop.index0] if loop.index0 < marks | length else "" %}
<tr{% if mark %} class="{{ mark }}"{% endif %}>
{%- for value in row %}<td{% if loop.index0 in numeric %} class="num"{% endif %}>{{ value }}</td>{% endfor -%}
</tr>
{%- endfor %}
</tbody></table>
{%- endmacro %}

{%- macro figure(png, title, caption) -%}
<figure><img src="{{ png | png_uri }}" alt="{{ title }}"><figcaption><b>{{ title }}.</b> {{ caption }}</figcaption></figure>
{%- endmacro %}

{%- macro section(s) -%}
<section id="{{ s.slug }}"><h2>{{ s.title }}</h2>
{%- if s.text %}<p class="note">{{ s.text }}</p>{% endif -%}
{%- if s.table %}
{%- set header = s.table[0].keys() | list -%}
{{ table(header, s.table | section_rows(header, s.formats),
         numeric=s.table | numeric_columns(header), id=s.slug) }}
{%- endif -%}
{%- for png in s.images | pngs %}<figure><img src="{{ png | png_uri }}" alt="{{ s.title }}"></figure>{% endfor -%}
</section>
{%- endmacro %}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ title }}</title>
<style>{{ css | safe }}</style></head>
<body>
{% block body %}{% endblock %}
<footer>Written by cnnlab {{ version }} on {{ now }}.</footer>
</body></html>
"""

RUN = """{% extends "page.html" %}{% from "macros.html" import table, figure, section %}
{% block body %}
<header><h1>{{ run.name }}{% if run.model != "?" %} <small>· {{ run.model }}</small>{% endif %}</h1>
<p class="sub">{% if run.dataset != "?" %}dataset {{ run.dataset }} · {% endif -%}
task {{ run.task }} · folder <code>{{ run.path }}</code></p>
{% if run.written_by -%}
<p class="status done">Written by <code>{{ run.written_by }}</code> ({{ run.known_files | join(", ") }}): this folder
holds no training epochs of its own; its numbers are in the sections below.</p>
{%- elif run.finished -%}
<p class="status done">Finished: {{ run.history | length }} epoch(s){{ planned }}, tested on the test split.</p>
{%- else -%}
<p class="status open">Run in progress or interrupted {{ where }}{{ stale }}. The test-split numbers and the task's
test plots come when it finishes; resume it with <code>cnnlab train --resume {{ run.path | string | quote }}</code>.</p>
{%- endif %}
</header>
{% if not run.written_by %}
<section id="summary"><h2>Summary</h2>{{ table(None, summary) }}</section>
<section id="curves"><h2>Learning curves</h2>
{%- if curves %}{{ figure(curves, "Learning curves", curves_caption) }}
{%- else %}<p class="note">No plots yet: no epoch has finished.</p>{% endif %}</section>
{% endif %}
{% for s in sections %}{{ section(s) }}
{% endfor -%}
{% if epochs %}<section id="epochs"><h2>Per epoch</h2>
<p class="note">One row per epoch (metrics.csv): learning rate at the epoch's last step, times in seconds;
the best epoch is in bold.</p>
{{ table(epochs.header, epochs.rows, numeric=range(epochs.header | length), id="per-epoch", marks=epochs.marks) }}
</section>{% endif %}
{% if not run.written_by %}<section id="model"><h2>Model</h2>
{%- if model_note %}<p class="note">{{ model_note }}</p>{% else %}{{ table(None, model) }}{% endif %}</section>
{% endif %}
{% if config.rows %}<section id="config"><h2>Configuration</h2>
{% if run.written_by %}<p class="note">config.json: the training recipe of the run this folder was made from;
values that differ from the defaults are in bold.</p>
{% else %}<p class="note">config.json (rerun with <code>cnnlab train --config config.json</code>); values that
differ from the defaults are in bold.</p>
{% endif %}
{{ table(("key", "value"), config.rows, marks=config.marks) }}
</section>{% endif %}
{% endblock %}
"""

COMPARE = """{% extends "page.html" %}{% from "macros.html" import table, figure %}
{% block body %}
<header><h1>Comparison of {{ runs | length }} runs</h1>
<p class="sub">{{ runs | map(attribute="path") | join(", ") }}</p></header>
<section id="overview"><h2>Runs</h2>
<p class="note">Test numbers are those of the model tested (best epoch by validation, else the last); a last
training value far better than the best validation value means over-fitting.</p>
{{ table(header, rows, numeric=numeric, id="runs") }}</section>
<section id="curves"><h2>Curves</h2>
{%- if curves %}{{ figure(curves, "Learning curves", "Solid: validation, dashed: training, one colour per run. "
  "Training far better than validation means over-fitting; both poor and flat, under-fitting.") }}
{%- else %}<p class="note">No run has finished an epoch yet.</p>{% endif %}</section>
{% endblock %}
"""


def _pngs(images: Sequence[Path | bytes]) -> list[bytes]:
    """The PNG bytes of a section's images; files that do not exist are skipped (a plot not drawn)."""
    out = []
    for image in images:
        if isinstance(image, (bytes, bytearray)):
            out.append(bytes(image))
        elif Path(image).is_file():
            out.append(Path(image).read_bytes())
    return out


def _environment():
    """Jinja2 with autoescaping on for every template (they are all HTML) and undefined names an error."""
    import jinja2  # installed with torch; imported here so importing the engine stays cheap

    env = jinja2.Environment(
        loader=jinja2.DictLoader({"macros.html": MACROS, "page.html": PAGE, "run.html": RUN, "compare.html": COMPARE}),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(
        png_uri=_png_uri, pngs=_pngs, quote=shlex.quote,
        section_rows=lambda rows, header, formats: [[_cell(r.get(k), formats.get(k)) for k in header] for r in rows],
        numeric_columns=lambda rows, header: [i for i, k in enumerate(header) if any(_is_number(r.get(k)) for r in rows)])
    return env


def _render(template: str, title: str, **context: Any) -> str:
    import cnnlab

    return _environment().get_template(template).render(
        title=title, css=CSS, version=cnnlab.__version__, now=f"{datetime.now():%Y-%m-%d %H:%M}", **context)


# ---------------------------------------------------------------- one run


def _summary(run: RunFolder) -> list[tuple[str, str]]:
    res, last = run.results if run.finished else None, run.history[-1] if run.history else {}
    rows: list[tuple[str, str]] = []
    if res is not None:
        rows += [(f"test {_title(name)}", _metric(name, value)) for name, value in run.test_metrics.items()]
    else:
        for prefix, label in (("train", "training"), ("val", "validation")):
            values = [f"{_title(m)} {_metric(m, last.get(f'{prefix}_{m}'))}" for m in run.metrics
                      if last.get(f"{prefix}_{m}") is not None]
            if values:
                rows.append((f"last {label}", " · ".join(values)))
    monitor = run.config.get("monitor", "val_loss") if run.has_val else "train_loss"
    best = res.get("best_epoch") if res else run.meta.get("best_epoch")
    tested = "; the model tested" if res and run.has_val else ""  # without validation the last epoch is tested
    rows.append(("best epoch", f"{best or '–'} (by {monitor}{tested})"))
    if run.has_val:
        rows += [(f"best validation {_title(m)}", _metric(m, run.best_val(m))) for m in run.metrics if m != "loss"
                 and run.best_val(m) is not None] or [("best validation loss", _num(run.best_val("loss")))]
    else:
        rows.append(("validation", "none (data.val_fraction = 0): the last epoch's model is the one tested"))
    rows.append(("epochs run / planned", f"{len(run.history)} / {run.config.get('epochs', '?')}"))
    if res is not None:
        rows.append(("stopped early", f"yes (patience {run.config.get('patience')})" if res.get("stopped_early")
                     else "no"))
        rows.append(("wall time (CPU time)", f"{duration(res.get('wall_s'))} ({duration(res.get('cpu_s'))})"))
    else:
        rows.append(("training time so far", duration(sum(v or 0 for v in run.column("time_s")))))
    rows.append(("training speed", f"{run.images_per_s:,.0f} images/s (mean over epochs)" if run.images_per_s else "–"))
    return rows


def _curves_png(run: RunFolder) -> bytes | None:
    """The run's curves.png when it is current, else the curves drawn now (no PNG yet, or plots=false)."""
    if run.finished and (run.path / "curves.png").is_file():
        return (run.path / "curves.png").read_bytes()
    return _figure_png(curves_figure(run.history)) if run.history else None


def _epochs(run: RunFolder) -> dict[str, Any] | None:
    if not run.history:
        return None
    columns = run.columns or list(dict.fromkeys(k for row in run.history for k in row))
    best = (run.results or {}).get("best_epoch") or run.meta.get("best_epoch")
    return {"header": [COLUMN_TITLES.get(k, k.replace("_", " ")) for k in columns],
            "rows": [[_num(row.get(k), COLUMN_FORMATS.get(k, ".4f")) for k in columns] for row in run.history],
            "marks": ["mark" if row.get("epoch") == best else "" for row in run.history]}


def _classes(run_or_results: RunFolder | dict[str, Any]) -> list[str]:
    if isinstance(run_or_results, RunFolder):
        names = (run_or_results.results or {}).get("classes") or run_or_results.meta.get("classes")
    else:
        names = run_or_results.get("classes")
    return [str(c) for c in names or []]


def model_size(run: RunFolder) -> tuple[int, int, tuple[int, ...]]:
    """(parameters, MACs per image, input shape) of the run's model, measured on the meta device (no weights)."""
    params, macs, shape, _ = _model_size(run)
    return params, macs, shape


def _model_size(run: RunFolder) -> tuple[int, int, tuple[int, ...], bool]:
    """``model_size`` and whether the model takes classes."""

    from cnnlab.analysis import summary
    from cnnlab.engine.tasks import task_class

    if not run.meta:
        raise CnnlabError("no checkpoint yet (last.json), so the input shape is unknown")
    shape = tuple(int(s) for s in run.meta["input_shape"])

    model = _meta_model(run)
    takes_classes = task_class(run.meta.get("task", "classification")).model_takes_num_classes
    totals = summary(model, shape, device="meta", training_memory=False).totals
    return totals.params, totals.macs, shape, takes_classes


def _meta_model(run: RunFolder) -> Any:
    """The run's model built on the meta device (its structure, no values). A ``backbone_weights`` option still
    reads its file, and copying values into meta tensors is a no-op that torch warns about once per tensor (a
    hundred lines per report): those warnings are silenced here, where no value is wanted."""
    import warnings

    import torch

    from cnnlab.engine.tasks._model import rebuild_model

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        return rebuild_model(run.meta, run.config.get("model", {}).get("options", {}))


def _model(run: RunFolder) -> tuple[list[tuple[str, Any]], str]:
    """(rows, "") of the model's size, or ([], why it is unavailable): the page is useful without it."""
    try:
        params, macs, shape, takes_classes = _model_size(run)
    except Exception as e:  # noqa: BLE001 - the page says why the sizes are missing
        params = _parameter_count(run)  # a model that cannot be traced on the meta device (detectors) still counts
        if params is None:
            return [], f"Parameter count and MACs unavailable: {type(e).__name__}: {e}"
        return [("model", run.model), ("input shape (C, H, W)", str(tuple(run.meta["input_shape"]))),
                ("parameters", f"{params:,}"), ("MACs per image", f"unavailable ({type(e).__name__}: {e})")], ""
    rows: list[tuple[str, Any]] = [("model", run.model), ("input shape (C, H, W)", str(shape))]
    if takes_classes:
        rows.append(("classes", len(_classes(run)) or run.meta.get("num_classes")))
    rows += [("parameters", f"{params:,}"), ("MACs per image", f"{macs:,} ({macs / 1e6:,.2f} M)")]
    return rows, ""


def _parameter_count(run: RunFolder) -> int | None:
    """The parameters of the run's model, built on the meta device (no forward pass), or None if it cannot be built."""
    try:
        model = _meta_model(run)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - the page says the sizes are unavailable
        return None


def _flat_config(config: dict[str, Any]) -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}`` (values as JSON, strings bare)."""
    flat = {}
    for key, value in config.items():
        items = value.items() if isinstance(value, dict) and key in ("model", "data", "optim", "distill") else [(None, value)]
        for sub, v in items:
            flat[key if sub is None else f"{key}.{sub}"] = v if isinstance(v, str) else json.dumps(v)
    return flat


def _config(run: RunFolder) -> dict[str, list]:
    from cnnlab.engine.config import TrainConfig

    defaults = _flat_config(TrainConfig().to_dict())
    flat = _flat_config(run.config)
    return {"rows": list(flat.items()), "marks": ["mark" if defaults.get(k) != v else "" for k, v in flat.items()]}


def task_sections(run: RunFolder) -> list[ReportSection]:
    """The sections registered for the run's task, called with results.json ({} unless the run is finished)."""
    fn = _SECTIONS.get(run.task)
    if fn is None:
        known = ", ".join(sorted(_SECTIONS)) or "none"
        return [ReportSection("Task sections", f"No report sections are registered for task {run.task!r} "
                                               f"(registered: {known}); the common parts above still apply.")]
    return list(fn(run.path, dict(run.results) if run.finished and run.results else {}))


def file_sections(run: RunFolder) -> list[ReportSection]:
    """The sections registered for the files the folder holds (``register_file_sections``), in registration order."""
    return [s for name in run.known_files for s in _FILE_SECTIONS[name].fn(run.path)]


def write_html_report(run_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                      sections: Sequence[ReportSection] | None = None) -> Path:
    """Write one self-contained HTML page about ``run_dir`` (default ``run_dir/report.html``); returns its path.

    ``sections`` are the task-specific parts; None takes them from the function registered for results.json's
    ``task`` (classification when it names none), followed by those of the files the folder holds
    (``register_file_sections``).
    """
    run = read_run(run_dir)
    path = Path(path) if path is not None else run.path / "report.html"
    planned = run.config.get("epochs")
    of = f" of {planned} planned" if planned else ""
    where = f"after epoch {len(run.history)}{of}" if run.history else "before its first epoch ended"
    model_rows, model_note = _model(run) if not run.written_by else ([], "")
    text = _render(
        "run.html", f"{run.name} – {run.model} · cnnlab report", run=run, planned=of, where=where,
        stale=" (results.json is from an earlier finish; training was resumed since)" if run.results else "",
        summary=_summary(run), curves=_curves_png(run), curves_caption=CURVES_CAPTION,
        sections=list(sections) if sections is not None else task_sections(run) + file_sections(run),
        epochs=_epochs(run),
        model=model_rows, model_note=model_note, config=_config(run))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


# ---------------------------------------------------------------- classification


def classification_sections(run_dir: str | os.PathLike, results: dict[str, Any]) -> list[ReportSection]:
    """Per-class precision/recall table, confusion matrix and misclassified test images of a finished run."""
    run_dir = Path(run_dir)
    if not results or not all(k in results for k in ("precision", "recall", "confusion")):
        return []
    classes = _classes(results)
    rows = []
    for i, (p, r, counts) in enumerate(zip(results["precision"], results["recall"], results["confusion"])):
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows.append({"#": i, "class": classes[i] if i < len(classes) else str(i), "precision": float(p),
                     "recall": float(r), "F1": float(f1), "support": int(sum(counts))})
    sections = [ReportSection(
        "Per class", "Test split. Precision: of the images predicted as the class, the share that are; recall: of the "
                     "images of the class, the share found; support: test images of the class.", table=rows)]
    confusion: Path | bytes = run_dir / "confusion_matrix.png"
    if not confusion.is_file():  # plots=false: drawn now from the counts in results.json
        import torch

        names = classes or [str(i) for i in range(len(results["confusion"]))]
        confusion = _figure_png(confusion_figure(torch.tensor(results["confusion"]), names))
    sections.append(ReportSection(
        "Confusion matrix", "Test split: rows are the true classes, columns the predictions; colours are "
                            "row-normalised (recall on the diagonal), the numbers are counts.", images=[confusion]))
    if (run_dir / "misclassified.png").is_file():
        sections.append(ReportSection("Misclassified test images",
                                      "The first misclassified test images, titled true -> predicted.",
                                      images=[run_dir / "misclassified.png"]))
    return sections


register_report_sections(DEFAULT_TASK, classification_sections)


# ---------------------------------------------------------------- cnnlab prune's folders

PRUNE_COLUMNS = {  # prune.json row key -> (column title, number format)
    "params": ("parameters", ",d"), "macs": ("MACs per image", ",d"), "sparsity": ("sparsity", ".1%"),
    "latency_ms": ("latency (ms)", ".2f"), "test_acc": ("test accuracy", ".2%"),
    "dense_bytes": ("dense bytes", ",d"), "csr_bytes": ("CSR bytes", ",d"), "bitmask_bytes": ("bitmask bytes", ",d"),
    "file_bytes": ("safetensors bytes", ",d"),
}


def _pruning_sections(folder: Path) -> list[ReportSection]:
    """report.html's "Pruning" section of a folder ``cnnlab prune`` wrote: amount -> parameters, MACs, sparsity,
    latency, test accuracy and sizes, read from its prune.json (one amount, or the rows of several), and the
    sparsity-accuracy curve when there is one."""
    path = Path(folder) / "prune.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["rows"] if "rows" in data else [data]
        first = rows[0]
        kind, scope, steps, epochs = first["kind"], first["scope"], first["steps"], first["finetune_epochs"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CnnlabError(f"{path} cannot be read as the prune.json `cnnlab prune` writes ({type(e).__name__}: "
                          f"{e}); the folder {path.parent} is damaged") from None
    table = [_report_row("source (unpruned)", first, "before")] + [_report_row(r["amount"], r, "after") for r in rows]
    latency = data.get("latency") or {}
    timing = (f" Latency: median of {latency.get('repeats')} forward passes of one image on the CPU "
              f"({latency.get('threads')} thread(s)), fp32 eager." if latency else "")
    source = data.get("source_run")
    text = (f"cnnlab prune{f' of {source}' if source else ''}: {kind}, {scope} scope, {steps} step(s), "
            f"{epochs} fine-tuning epoch(s) after each. The first row is the source model. Parameters and MACs "
            "are counted by cnnlab.summary; sparsity is the share of zeros in the conv/linear weights; test "
            "accuracy is on the source run's test split." + timing + " Sizes: dense is the fp32 state_dict as saved "
            "(zeros take as much room as any weight), CSR and bitmask the sparse encodings of the pruned layers "
            "(other tensors dense), safetensors the weights file on disk.")
    images = [Path(folder) / "sparsity_accuracy.png"]
    formats = {"amount": "g", **{title: fmt for title, fmt in PRUNE_COLUMNS.values()}}
    return [ReportSection("Pruning", text, table=table, images=images, formats=formats)]


def _report_row(amount: Any, row: dict[str, Any], when: str) -> dict[str, Any]:
    """One table row: the values after pruning (or before, for the source row); sizes only after."""
    out: dict[str, Any] = {"amount": amount}
    for key, (title, _) in PRUNE_COLUMNS.items():
        if key.endswith("_bytes"):
            out[title] = row.get(key) if when == "after" else None
        else:
            out[title] = row.get(f"{key}_{when}", row.get(key) if key == "sparsity" and when == "after" else None)
    return out


register_file_sections("prune.json", _pruning_sections, command="cnnlab prune")


# ---------------------------------------------------------------- several runs


def _mathtext_safe(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib reads $...$ in labels as maths


def comparison_figure(runs: Sequence[RunFolder]):
    """Loss and each other metric per epoch of every run: validation solid, training dashed, one colour per run."""
    plt = pyplot()
    names = list(dict.fromkeys(m for run in runs for m in run.metrics)) or ["loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), layout="constrained", squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour, label = colours[i % len(colours)], _mathtext_safe(run.name)
        for j, (ax, name) in enumerate(zip(axes.flat, names)):
            for prefix, style, kind in (("train", "--", "train"), ("val", "o-", "val")):
                pairs = [(r["epoch"], r[f"{prefix}_{name}"]) for r in run.history if r.get(f"{prefix}_{name}") is not None]
                if pairs:
                    ax.plot([e for e, _ in pairs], [v for _, v in pairs], style, color=colour, markersize=3,
                            alpha=0.6 if kind == "train" else 1.0, label=f"{label} ({kind})" if j == 0 else None)
    for ax, name in zip(axes.flat, names):
        title = _title(name)
        if name == "loss":
            ax.set_yscale("log")  # one diverging run would otherwise flatten all the others
            title += " (log scale)"
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)  # one legend for every panel, beside them
    return fig


def write_comparison_report(run_dirs: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Write one HTML page comparing ``run_dirs``: a table of their results and their overlaid learning curves."""
    if not run_dirs:
        raise CnnlabError("no run folders to compare; give at least one")
    runs = [read_run(d) for d in run_dirs]
    tests = list(dict.fromkeys(name for run in runs for name in run.test_metrics))
    metrics = list(dict.fromkeys(m for run in runs for m in run.metrics if m != "loss")) or ["loss"]
    header = (["run", "model", "dataset", "epochs run / planned"] + [f"test {_title(n)}" for n in tests]
              + [f"best val {_title(m)}" for m in metrics] + [f"last train {_title(m)}" for m in metrics]
              + ["wall time", "status"])
    rows = []
    for run in runs:
        res = run.results if run.finished else None
        last = run.history[-1] if run.history else {}
        rows.append([run.name, run.model, run.dataset, f"{len(run.history)} / {run.config.get('epochs', '?')}"]
                    + [_metric(n, run.test_metrics.get(n)) for n in tests]
                    + [_metric(m, run.best_val(m)) for m in metrics]
                    + [_metric(m, last.get(f"train_{m}")) for m in metrics]
                    + [duration(res.get("wall_s")) if res else "–", "finished" if res else "in progress or interrupted"])
    plotted = [run for run in runs if run.history]
    curves = _figure_png(comparison_figure(plotted)) if plotted else None
    text = _render("compare.html", f"cnnlab comparison of {len(runs)} runs", runs=runs, header=header, rows=rows,
                   numeric=list(range(3, len(header) - 1)), curves=curves)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)
