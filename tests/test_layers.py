"""The modules of posttrain/ form layers: no import cycle, not even one hidden in a function-level
import (scripts/check_imports.py). And the checker itself sees what it claims to see."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "check_imports", Path(__file__).parent.parent / "scripts" / "check_imports.py")
check_imports = sys.modules["check_imports"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(check_imports)


def test_posttrain_has_no_import_cycle():
    cycles = check_imports.import_cycles(check_imports.ROOT / "posttrain")
    assert not cycles, "import cycles inside posttrain/:\n" + "\n".join(cycles)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_lazy_import_that_closes_a_circle_is_a_cycle(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.a import thing\n    return thing\n",
        "pkg/c.py": "import torch\n",  # outside the package: not an edge
    })
    assert check_imports.import_cycles(package) == ["pkg.a -> pkg.b -> pkg.a"]


def test_type_checking_imports_and_outside_modules_are_not_edges(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import json\nfrom pkg.b import f\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n"
                     "else:\n    import os\ndef f():\n    import torch\n"),
    })
    assert check_imports.import_graph(package) == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert check_imports.import_cycles(package) == []


def test_a_package_init_is_the_package_and_runs_before_its_modules(tmp_path):
    # pkg.a imports pkg.sub.x, which runs pkg/sub/__init__.py first; that imports pkg.a back.
    package = write_package(tmp_path, {
        "pkg/__init__.py": "def __getattr__(name):\n    from pkg import a\n    return a\n",
        "pkg/a.py": "from pkg.sub import x\n",
        "pkg/sub/__init__.py": "from .y import thing\n",
        "pkg/sub/x.py": "",
        "pkg/sub/y.py": "def thing():\n    from pkg import a\n",
        "pkg/c.py": "from pkg.a import name\n",
    })
    graph = check_imports.import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.x"}
    assert graph["pkg.sub"] == {"pkg.sub.y"}  # a relative import, resolved from the package
    assert graph["pkg"] == {"pkg.a"}  # the root's own modules never import it as a parent
    assert check_imports.import_cycles(package) == ["pkg.a -> pkg.sub -> pkg.sub.y -> pkg.a"]


def test_a_knot_names_its_shortest_cycle_and_every_module_in_it(tmp_path):
    package = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\nimport pkg.c\n",
        "pkg/b.py": "import pkg.a\n",
        "pkg/c.py": "import pkg.d\n",
        "pkg/d.py": "import pkg.a\n",
    })
    assert check_imports.import_cycles(package) == ["pkg.a -> pkg.b -> pkg.a (also in the knot: pkg.c, pkg.d)"]
    assert check_imports.main([str(package)]) == 1
