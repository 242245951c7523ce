"""Documentation that cannot drift: the README's option tables against the real CLI, the
README's Python examples run, the presets table against the presets' metadata, and the API
reference built from the docstrings."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import pytest
import typer

from quicksilver.cli import app
from quicksilver.config import PRESET_INFO, PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands(group: click.Group, prefix: str = "quicksilver") -> dict[str, click.Command]:
    """Every command of the CLI by its full name (``quicksilver eval``), sub-groups included."""
    found = {}
    for name, cmd in group.commands.items():
        if getattr(cmd, "hidden", False):
            continue
        if isinstance(cmd, click.Group):
            found.update(commands(cmd, f"{prefix} {name}"))
        else:
            found[f"{prefix} {name}"] = cmd
    return found


def readme_tables() -> dict[str, list[list[str]]]:
    """Per ``### `quicksilver CMD` `` heading, the rows of its ``| option | default | meaning |`` table."""
    tables: dict[str, list[list[str]]] = {}
    for section in re.split(r"^### ", README, flags=re.M)[1:]:
        head = re.match(r"`(quicksilver[\w -]*)`", section)
        if not head:
            continue
        rows = None
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                if line.startswith("|") and [c.lower() for c in cells[:3]] == ["option", "default", "meaning"]:
                    rows = []
            elif line.startswith("|"):
                if not set(cells[0]) <= set("-: "):
                    rows.append(cells)
            elif rows:
                break  # the first table after the heading only
        tables[head.group(1).strip()] = rows or []
    return tables


def _norm(cell: str) -> str:
    return cell.replace("`", "").replace(",", "").strip()


def _default_problem(param: click.Parameter, cell: str) -> str | None:
    """What is wrong with the README's default cell for this parameter (None: nothing)."""
    documented, real = _norm(cell), param.default
    if param.required:
        return None if documented == "(required)" else "is required: its default cell must say (required)"
    if isinstance(real, bool) and getattr(param, "is_flag", False):
        allowed = {param.opts[0], "on"} if real else {"", "off"}
        return None if documented in allowed else f"default is {'on' if real else 'off'}, README says {documented or '(empty)'}"
    if real is None or real == [] or real == ():
        # No fixed default: the cell may describe what happens (``all``, ``window-1``), never claim a number.
        return f"has no default, README says {documented}" if re.fullmatch(r"-?[\d.]+", documented) else None
    expected = ", ".join(map(str, real)) if isinstance(real, (list, tuple)) else str(real)
    return None if documented == expected else f"default is {expected}, README says {documented or '(empty)'}"


def readme_cli_problems(group: click.Group) -> list[str]:
    """Where README.md and the commands of ``group`` disagree: options missing, stale, or with other defaults."""
    tables = readme_tables()
    problems = []
    for name, cmd in commands(group).items():
        rows = tables.get(name)
        if not rows:
            problems.append(f"{name}: no `### \\`{name}\\`` section with an | option | default | meaning | table")
            continue
        by_name = {}
        for row in rows:
            for token in re.findall(r"--[\w-]+|(?<![\w-])-\w\b|\b[A-Z][A-Z_]+\b", row[0].replace("/", " ")):
                by_name[token] = row
        documented = set(by_name)
        real = set()
        for param in cmd.params:
            if getattr(param, "hidden", False):
                continue
            argument = param.param_type_name == "argument"
            names = [param.name.upper()] if argument else [*param.opts, *param.secondary_opts]
            real.update(names)
            missing = [n for n in names if n not in by_name]
            if missing:
                problems.append(f"{name}: {', '.join(missing)} not documented")
                continue
            row = by_name[names[0]]
            problem = None if argument else _default_problem(param, row[1] if len(row) > 1 else "")
            if problem:
                problems.append(f"{name} {names[0]}: {problem}")
        stale = {n for n in documented - real if n.startswith("-")}
        if stale:
            problems.append(f"{name}: README documents {', '.join(sorted(stale))}, which the command does not have")
    return problems


def test_readme_documents_every_cli_option_with_its_default():
    """Each command has a `### \\`quicksilver CMD\\`` table; its rows name exactly the command's options."""
    problems = readme_cli_problems(typer.main.get_command(app))
    assert not problems, "README.md and the CLI disagree:\n" + "\n".join(problems)


def test_the_drift_check_fails_on_an_undocumented_option_or_default():
    """The check above is real: an extra option, a changed default, or a new command fails it."""
    group = typer.main.get_command(app)
    group.commands["eval"].params.append(click.Option(["--brand-new-option"], default=3))
    next(p for p in group.commands["sweep"].params if p.name == "window").default = 2048
    group.commands["needle-test"] = click.Command("needle-test", params=[click.Option(["--depth"], default=0.5)])
    problems = readme_cli_problems(group)
    assert "quicksilver eval: --brand-new-option not documented" in problems
    assert "quicksilver sweep --window: default is 2048, README says 4096" in problems
    assert any(p.startswith("quicksilver needle-test: no `### ") for p in problems)
    assert not readme_cli_problems(typer.main.get_command(app))  # a fresh build of the commands is unchanged


def test_presets_table_states_every_presets_promise_and_reach():
    """README's presets table lists every preset with the promise and reach of its PresetInfo."""
    assert set(PRESET_INFO) == set(PRESETS), "every preset needs a PresetInfo entry in config.py (and a row in README)"
    rows = {}
    for line in README.split("### Presets", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells
    for name, info in PRESET_INFO.items():
        assert name in rows, f"preset {name} missing from README's presets table"
        promise, reach = rows[name][1], rows[name][2].replace(",", "")
        assert _norm(promise) == _norm(info.promise), f"{name}: README promise {promise!r}, config.py {info.promise!r}"
        for section, n in info.acts_from.items():
            assert f"{section} {n}" in reach, f"{name}: README reach {reach!r} lacks '{section} {n:,}'"


# README examples run with small sizes: a few tokens are enough to prove the calls work.
SMALL = [(r"max_tokens=\d+", "max_tokens=32"), (r"window=\d+", "window=32"), (r"max_new_tokens=\d+", "max_new_tokens=3")]


def readme_python_blocks() -> list[str]:
    """The README's Python examples, less those that talk to a `quicksilver serve` started
    beside them (tests/test_serve.py drives a real server with the same client calls)."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    return [b for b in blocks if "OpenAI(base_url" not in b]


@pytest.mark.real_model
def test_readme_python_examples_run(default_model, tmp_path, monkeypatch, capsys):
    import quicksilver
    import quicksilver.models

    blocks = readme_python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # examples may save files
    real_load = quicksilver.models.load_model

    def load_once(name="smollm2-135m", *args, **kwargs):  # the session's copy of the default model, not a reload
        default = name == "smollm2-135m" and not args and str(kwargs.get("dtype", "float32")) in ("float32", "torch.float32") and str(kwargs.get("device", "cpu")) == "cpu"
        return default_model if default else real_load(name, *args, **kwargs)

    monkeypatch.setattr(quicksilver, "load_model", load_once)
    monkeypatch.setattr(quicksilver.models, "load_model", load_once)
    for i, block in enumerate(blocks):
        code = block
        for pattern, small in SMALL:
            code = re.sub(pattern, small, code)
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "readme_example"})
        except Exception as e:
            pytest.fail(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{block}")
    assert capsys.readouterr().out.strip()  # the examples print what they show


def test_api_reference_builds_from_the_docstrings(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build_api
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert build_api.build(tmp_path, search=False) == []
    assert (tmp_path / "quicksilver" / "config.html").is_file()
    assert "PresetInfo" in (tmp_path / "quicksilver.html").read_text(encoding="utf-8")


def test_a_broken_docstring_reference_is_caught(monkeypatch):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build_api
    finally:
        sys.path.remove(str(ROOT / "docs"))
    import quicksilver.flops as flops

    doc = flops.dense_forward_flops.__doc__ + "\n    See ``Config.with_setting`` and ``quicksilver.flops.no_such``; ``Config.preset`` exists."
    monkeypatch.setattr(flops.dense_forward_flops, "__doc__", doc)
    assert build_api.broken_references(["quicksilver.flops"]) == [
        "quicksilver.flops: Config.with_setting", "quicksilver.flops: quicksilver.flops.no_such",
    ]
