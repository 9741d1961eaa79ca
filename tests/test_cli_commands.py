"""`medssl`'s command table: every command and option it had before ``medssl/cli.py`` was split by command
group (``cli_train``, ``cli_studies``, ``cli_deploy``), on one app, also under ``python -m medssl.cli``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medssl.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# `medssl --help` of 2026-11-30, before the split, in its order (groups last); a lost command fails the test
COMMANDS = ["ingest", "split", "pretrain", "finetune", "sweep", "compare", "demo", "predict", "export", "register",
            "version", "runs", "bundle"]  # fmt: skip
# each command's arguments (upper case) and options (first spelling), in order, from the same `--help`
OPTIONS = {
    "ingest": ["SOURCES", "--out", "--labels", "--workers", "--tilt", "--uneven", "--four-d", "--copy-nifti", "--salt",
               "--group-by", "--verbose"],
    "split": ["DATALIST", "--fractions", "--seeds", "--test-fraction", "--val-fraction", "--out", "--report",
              "--verbose"],
    "pretrain": ["--datalist", "--method", "--encoder", "--out", "--config", "--splits", "--steps", "--batch-size",
                 "--roi", "--device", "--seed", "--resume", "--set", "--dry-run", "--time-steps", "--json", "--verbose"],
    "finetune": ["--datalist", "--splits", "--fraction", "--seed", "--init", "--task", "--network", "--out",
                 "--config", "--epochs", "--roi", "--device", "--resume", "--set", "--dry-run", "--time-steps", "--json",
                 "--verbose"],
    "sweep": ["PIPELINE", "--new", "--set", "--slurm", "--emit-jobs", "--child", "--parent-run", "--dry-run",
              "--time-steps", "--json", "--verbose"],
    "compare": ["--study", "--metric", "--tracking-uri", "--out", "--config-hash", "--target", "--within", "--verbose"],
    "demo": ["--out", "--sample", "--verbose"],
    "predict": ["MODEL", "INPUTS", "--out", "--ensemble", "--backend", "--device", "--batch", "--tta", "--probabilities",
                "--dicom-seg", "--tracking-uri", "--verbose"],
    "export": ["MODEL", "--out", "--bundle", "--format", "--opset", "--volume", "--method", "--tracking-uri",
               "--verbose"],
    "register": ["RUN", "--name", "--alias", "--example", "--tracking-uri", "--verbose"],
    "version": [],
    "runs sync": ["PATHS", "--tracking-uri", "--verbose"],
    "bundle run": ["CONFIG", "--meta", "--variant", "--set", "--run-id", "--verbose"],
}  # fmt: skip


def _listed(help_text: str) -> list[str]:
    """Command names in the order a ``--help`` page's Commands panel shows them."""
    panel = help_text.split("Commands")[-1]
    return [line.strip("│ ").split()[0] for line in panel.splitlines() if line.startswith("│ ") and line[2] != " "]


def test_help_lists_every_command_in_order() -> None:
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert _listed(res.output) == COMMANDS
    for group, sub in (("runs", "sync"), ("bundle", "run")):
        page = runner.invoke(app, [group, "--help"], env={"COLUMNS": "160"})
        assert page.exit_code == 0 and _listed(page.output) == [sub], page.output


def test_every_command_keeps_its_options() -> None:
    root = typer.main.get_command(app)
    found = {}
    for name, cmd in root.commands.items():
        for sub, leaf in getattr(cmd, "commands", {name: cmd}).items():
            key = name if sub == name else f"{name} {sub}"
            found[key] = [p.opts[0] if p.opts[0].startswith("-") else p.name.upper() for p in leaf.params]
    assert found == OPTIONS


@pytest.mark.parametrize("command", [c for c in OPTIONS if c != "version"])
def test_every_command_help_shows_its_options(command: str) -> None:
    res = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert all(opt in res.output for opt in OPTIONS[command] if opt.startswith("--")), res.output


def test_usage_exit_codes() -> None:
    assert runner.invoke(app, []).exit_code == 2  # no command: the help, as bad usage
    lost = runner.invoke(app, ["nope"])
    assert lost.exit_code == 2 and "No such command" in lost.output
    bad = runner.invoke(app, ["split", "x.json", "--fractions", "1,ten"])
    assert bad.exit_code == 2 and "comma-separated list of float" in bad.output  # cli_common.csv_list


def test_python_m_medssl_cli_has_the_same_commands() -> None:
    """What the SLURM scripts run (``python -m medssl.cli``): ``medssl.cli`` as ``__main__`` registers the
    command modules' commands on its own app."""
    out = subprocess.run([sys.executable, "-m", "medssl.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "COLUMNS": "160"}, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert _listed(out.stdout) == COMMANDS
