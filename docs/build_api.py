"""Build the API reference (HTML, with pdoc) from the docstrings; fail on a broken reference.

    python docs/build_api.py [OUTPUT_DIR]      # default docs/api (git ignores it); `make docs`

Every module of the quicksilver package is documented (numpy-style docstrings). A docstring
that names ``quicksilver.module.thing`` or ``ExportedName.attribute`` must name something that
exists, and pdoc must import every module without a warning: otherwise this exits with status 1
and lists what is broken.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from pathlib import Path

# ``quicksilver.evaluate.evaluate_model`` or ``Config.with_settings``, in single or double backticks.
REFERENCE = re.compile(r"``?((?:quicksilver(?:\.\w+)+)|(?:[A-Z]\w+\.[a-z_]\w*))(?:\(\))?``?")


def modules() -> list[str]:
    """The package and every submodule, by name."""
    import quicksilver

    names = ["quicksilver"]
    for info in pkgutil.walk_packages(quicksilver.__path__, "quicksilver."):
        names.append(info.name)
    return list(dict.fromkeys(names))  # a package walked twice (imported during the walk) lists a module twice


def _resolves(ref: str, namespaces) -> bool:
    """Whether a dotted reference names an attribute chain from a module, or from the first
    namespace whose names include its head (unknown heads, e.g. third-party names, pass)."""
    parts = ref.split(".")
    if parts[0] == "quicksilver":
        for i in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            rest = parts[i:]
            break
        else:
            return False
    else:
        owners = [ns for ns in namespaces if hasattr(ns, parts[0])]
        if not owners:
            return True
        obj, rest = getattr(owners[0], parts[0]), parts[1:]
    for name in rest:
        if not hasattr(obj, name) and name not in getattr(obj, "__dataclass_fields__", {}):
            return False
        obj = getattr(obj, name, None)
    return True


def broken_references(names: list[str]) -> list[str]:
    """``module: reference`` for every docstring reference that names nothing."""
    import quicksilver

    broken = []
    for module_name in names:
        module = importlib.import_module(module_name)
        objects = [module] + [obj for _, obj in inspect.getmembers(module) if getattr(obj, "__module__", None) == module_name]
        for obj in list(objects):
            if inspect.isclass(obj):
                objects += [m for _, m in inspect.getmembers(obj) if inspect.isfunction(m) or isinstance(m, property)]
        for obj in objects:
            for ref in REFERENCE.findall(inspect.getdoc(obj) or ""):
                if not _resolves(ref, [module, quicksilver]):
                    broken.append(f"{module_name}: {ref}")
    return sorted(set(broken))


def build(output: Path, search: bool = True) -> list[str]:
    """Write the HTML reference into ``output``; return the problems found (empty: all good).
    ``search=False`` leaves out the search index (what the test suite builds: the same pages, sooner)."""
    import pdoc
    import pdoc.render

    names = modules()
    problems = broken_references(names)
    pdoc.render.configure(docformat="numpy", search=search)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*names, output_directory=output)
    # A module pdoc meets twice (lm-eval's registry imports ours while pdoc walks) is documented
    # once; that notice is not a broken reference.
    problems += [f"pdoc: {w.message}" for w in caught if "quicksilver" in str(w.message) and "already been added" not in str(w.message)]
    return problems


def main() -> None:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "api")
    problems = build(output)
    for p in problems:
        print(f"broken: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"wrote {output}/index.html")


if __name__ == "__main__":
    main()
