"""``cnnlab report RUN`` (one run's HTML page) and ``cnnlab report RUN RUN ...`` (a page comparing runs)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="write an HTML report of a run, or compare several runs",
        description="One run folder: write RUN/report.html, one self-contained page (summary numbers, learning "
                    "curves, confusion matrix, misclassified images, per-class and per-epoch tables, model size, "
                    "config); works on interrupted runs too, and on a folder `cnnlab prune` wrote (its Pruning "
                    "section). Several run folders: write one page comparing them (a table and their learning "
                    "curves overlaid).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) (runs/<name>)")
    p.add_argument("--out", metavar="HTML", help="where to write the page (default: RUN/report.html for one run, "
                                                 "compare.html beside the first run folder for several)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cnnlab.cli._paths import make_parent, output_path
    from cnnlab.engine.html_report import write_comparison_report, write_html_report

    output_path(args.out, "--out", suffix=".html")
    if len(args.runs) == 1:
        path = write_html_report(args.runs[0], make_parent(args.out, "--out"))
    else:
        path = write_comparison_report(args.runs, make_parent(args.out, "--out") or Path(args.runs[0]).parent / "compare.html")
    print(path)
    return 0
