"""`cnnlab --help`, `--version`, every sub-command's `--help` and argument errors never import torch.

Importing torch costs seconds (about 4 s on the project's CPUs), all of `cnnlab --help`'s time before
the parser was built without it. Timing is not asserted (machines differ); what is asserted is the
cause: torch, and the model modules that import it, are not in ``sys.modules`` after the parser has
answered. Each check runs in a fresh interpreter, since this test process has imported torch already.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "torchvision", "numpy", "matplotlib", "cnnlab.models", "cnnlab.engine", "cnnlab.analysis")

# Runs main() on each argument list in one fresh interpreter (argparse answers --help and errors by
# SystemExit), then reports the exit codes and which heavy modules got imported.
PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from cnnlab.cli.main import build_parser, main

    commands = sorted(build_parser()._subparsers._group_actions[0].choices)
    cases = [["--help"], ["--version"], [], ["no-such-command"]]
    cases += [[c, "--help"] for c in commands] + [[c, "--no-such-option"] for c in commands]
    codes = {}
    for argv in cases:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
        codes[" ".join(argv)] = [code, len(out.getvalue()), err.getvalue()[-2000:]]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {h.split(".")[0] for h in HEAVY}
                   and any(m == h or m.startswith(h + ".") for h in HEAVY))
    print(json.dumps({"commands": commands, "codes": codes, "heavy": heavy}))
""")


def _probe() -> dict:
    code = f"HEAVY = {HEAVY!r}\n" + PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_parser_answers_without_importing_torch() -> None:
    probe = _probe()
    assert {"train", "report", "summary", "models", "demo"} <= set(probe["commands"])
    assert probe["heavy"] == [], f"building or running the parser imported {probe['heavy']}"
    codes = probe["codes"]
    assert codes["--help"][0] == 0 and codes["--help"][1] > 200  # the help text was printed
    assert codes["--version"][0] == 0 and codes[""][0] == 0
    assert codes["no-such-command"][0] == 2 and "invalid choice" in codes["no-such-command"][2]
    for command in probe["commands"]:
        assert codes[f"{command} --help"][0] == 0 and codes[f"{command} --help"][1] > 0, command
        bad = codes[f"{command} --no-such-option"]
        assert bad[0] == 2 and "error:" in bad[2], (command, bad)  # the bad option, or a missing argument first


def test_importtime_of_help_has_no_torch() -> None:
    """The check the issue asks for, as a user runs it: python -X importtime -m cnnlab.cli.main --help."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cnnlab.cli.main", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: cnnlab" in done.stdout, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    # importtime logs `import` statements (the sub-command modules' own imports, torch's among them), not the
    # importlib.import_module calls that load those modules; the first test covers sys.modules as a whole
    assert "cnnlab.cli" in imported and len(imported) > 20
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "cnnlab --help imported torch"
