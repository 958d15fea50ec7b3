"""The structured result of ``summary``: rows, totals, and their table/CSV/JSON/Markdown forms."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnnlab._io import atomic_write_text, dumps_json


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (decimal prefixes: 1 MB = 10^6 bytes)."""
    if n is None:
        return "?"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


@dataclass
class Row:
    """One line of the table: a module (or a folded group of modules) and what it did for one image."""

    name: str
    type: str
    output_shape: tuple | None
    trainable: int
    frozen: int
    macs: int  # counted MACs; ``uncounted`` names the ops that could not be counted
    uncounted: list[str]
    act_elements: int
    act_bytes: int
    rf: tuple | None  # receptive field size per spatial axis (input pixels)
    jump: tuple | None  # distance between neighbouring output units, in input pixels
    rf_whole: bool = False  # depends on the whole input region reached (global pooling, SE, FC)
    rf_start: tuple | None = None  # centre of output unit 0, in input pixel coordinates

    @property
    def params(self) -> int:
        return self.trainable + self.frozen


@dataclass
class Totals:
    """Model totals for one image (batch 1); bytes at the summary's dtype."""

    params: int
    trainable: int
    frozen: int
    macs: int
    macs_by_kind: dict[str, int]
    param_bytes: int
    input_elements: int
    act_elements: int  # forward activations incl. the input
    act_bytes: int
    saved_bytes: int | None  # what autograd keeps for backward, per image (measured, train mode)
    uncounted: dict[str, list[str]] = field(default_factory=dict)  # op -> layers

    @property
    def flops(self) -> int:
        return 2 * self.macs  # one multiply-accumulate = one multiply + one add


@dataclass
class Summary:
    """Result of ``cnnlab.summary``: ``rows``, ``totals``; print it, or export with to_csv/to_json/to_markdown."""

    name: str
    input_size: tuple
    rows: list[Row]
    totals: Totals
    depth: int | None
    batch_size: int
    dtype: str
    itemsize: int
    optimizer: str
    optimizer_states: int
    conventions: str

    def training_memory(self, batch_size: int | None = None, optimizer_states: int | None = None) -> int | None:
        """Bytes to train: weights + gradients + optimizer states + activations saved for backward x batch."""
        if self.totals.saved_bytes is None:
            return None
        b = self.batch_size if batch_size is None else batch_size
        k = self.optimizer_states if optimizer_states is None else optimizer_states
        return self.totals.param_bytes * (2 + k) + b * self.totals.saved_bytes

    # -- exports --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        t = self.totals
        totals = {**asdict(t), "flops": t.flops, "training_memory": self.training_memory()}
        return {"model": self.name, "input_size": list(self.input_size), "dtype": self.dtype,
                "batch_size": self.batch_size, "optimizer": self.optimizer,
                "rows": [asdict(r) for r in self.rows], "totals": totals, "conventions": self.conventions}

    def to_json(self, path: str | Path | None = None) -> str:
        text = dumps_json(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text)
        return text

    _FIELDS = ("name", "type", "output_shape", "trainable", "frozen", "macs", "uncounted", "act_elements",
               "act_bytes", "rf", "jump", "rf_whole")

    def to_csv(self, path: str | Path | None = None) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self._FIELDS)
        for r in self.rows:
            d = asdict(r)
            w.writerow(["x".join(map(str, v)) if isinstance(v, tuple) and v and not isinstance(v[0], tuple)
                        else ";".join(v) if isinstance(v, list) else "" if v is None else v
                        for v in (d[f] for f in self._FIELDS)])
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        show_frozen = self.totals.frozen > 0
        headers = ["layer", "type", "output", "params"] + (["frozen"] if show_frozen else []) + \
            ["MACs", "activations", "act. mem", "RF", "stride"]
        rows = []
        for r in self.rows:
            macs = human(r.macs) + ("+?" if r.uncounted else "")
            rf = ("" if r.output_shape is None else "?") if r.rf is None else "all" if r.rf_whole else "x".join(f"{v:g}" for v in r.rf)
            jump = "" if r.jump is None else "x".join(f"{v:g}" for v in r.jump)
            shape = "" if r.output_shape is None else _shape(r.output_shape)
            rows.append([r.name, r.type, shape, human(r.trainable)] + ([human(r.frozen)] if show_frozen else []) +
                        [macs, human(r.act_elements), human(r.act_bytes, "B"), rf, jump])
        return headers, rows

    def footer(self) -> list[str]:
        t = self.totals
        mem = self.training_memory()
        lines = [
            f"params: {t.params:,} ({human(t.params)}; trainable {t.trainable:,}, frozen {t.frozen:,})",
            f"MACs: {t.macs:,} ({human(t.macs)}) = " + " + ".join(f"{k} {human(v)}" for k, v in sorted(t.macs_by_kind.items())),
            f"FLOPs: {t.flops:,} ({human(t.flops)}) = 2 x MACs",
            f"parameter memory: {human(t.param_bytes, 'B')} ({self.dtype})",
            f"forward activations per image: {t.act_elements:,} elements = {human(t.act_bytes, 'B')} "
            f"(input {t.input_elements:,} included)",
        ]
        if mem is not None:
            lines.append(
                f"training memory, batch {self.batch_size}, {self.optimizer}: {human(mem, 'B')} = params x "
                f"(1 weights + 1 grads + {self.optimizer_states} optimizer states) {human(t.param_bytes * (2 + self.optimizer_states), 'B')}"
                f" + {self.batch_size} x {human(t.saved_bytes, 'B')} saved for backward per image (measured)")
        else:
            lines.append("training memory: not measured (the model cannot run a train-mode forward on a bare input)")
        if t.uncounted:
            lines.append("UNCOUNTED (MACs unknown, not zero): " + "; ".join(
                f"{op} in {', '.join(layers[:3])}{' ...' if len(layers) > 3 else ''}" for op, layers in t.uncounted.items()))
        lines.append(f"input {'x'.join(map(str, self.input_size))}, batch 1; 1 MB = 10^6 bytes. "
                     "RF all = depends on the whole input (after global pooling, flatten or SE scaling).")
        lines.append("conventions: " + self.conventions)
        return lines

    def to_markdown(self) -> str:
        headers, rows = self._cells()
        out = [f"**{self.name}** at {'x'.join(map(str, self.input_size))}", "",
               "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        out += [""] + [f"- {line}" for line in self.footer()]
        return "\n".join(out)

    def table(self) -> str:
        headers, rows = self._cells()
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        left = {0, 1, 2}

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines = [f"{self.name} at {'x'.join(map(str, self.input_size))}", rule, fmt(headers), rule]
        lines += [fmt(r) for r in rows] + [rule] + self.footer()
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shape(shape: tuple) -> str:
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_shape(s) for s in shape)
    return "x".join(map(str, shape[1:])) if len(shape) > 1 else str(shape[0])
