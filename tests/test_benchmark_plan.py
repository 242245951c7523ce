"""Every step of `make results` (benchmarks/results.py's STEPS) starts: its script imports, and its
parser takes the plan's arguments, choices and types included. Nothing is measured: the test stops
each script at its argument parser, so a renamed option or a broken import fails here in a second,
not an hour into a run of the whole plan."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import results  # noqa: E402


class Parsed(Exception):
    def __init__(self, namespace, extras):
        self.namespace, self.extras = namespace, extras


SCRIPTS = {step: cmd for step, cmd in results.STEPS.items() if cmd[0].startswith("benchmarks/")}


def test_every_step_but_the_cli_ones_is_a_script():
    others = {step: cmd[0] for step, cmd in results.STEPS.items() if step not in SCRIPTS}
    assert others == {"pareto": "quicksilver"}  # the CLI's options are checked by its own tests (test_cli)


@pytest.mark.parametrize("step", sorted(SCRIPTS))
def test_a_steps_script_takes_the_plans_arguments(step, monkeypatch):
    script, *argv = SCRIPTS[step]
    assert (ROOT / script).is_file()

    def stop(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)  # a bad choice or type exits 2 here
        raise Parsed(namespace, extras)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    with pytest.raises(Parsed) as got:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert got.value.extras == [], f"{script} does not take {got.value.extras}"
    if "--out" in argv:
        assert got.value.namespace.out == results.OUT
