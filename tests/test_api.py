"""The public API: ``gradscope.__all__`` lists exactly what the package exports, sorted, and the
package ships ``py.typed`` so that type checkers use its annotations."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from importlib import resources
from pathlib import Path

import gradscope

_PUBLIC_DUNDERS = {"__version__"}


def test_all_is_sorted() -> None:
    assert gradscope.__all__ == sorted(gradscope.__all__)
    assert len(set(gradscope.__all__)) == len(gradscope.__all__)


def test_all_matches_the_exported_members() -> None:
    """Every public name gradscope defines and exports (lazy ones included) is in ``__all__``, and
    nothing else: helpers it merely imports (``typing.Any``, submodules) are not exports."""
    exported = set()
    for name in dir(gradscope):
        if name.startswith("_") and name not in _PUBLIC_DUNDERS:
            continue
        value = getattr(gradscope, name)
        if isinstance(value, types.ModuleType):
            continue
        if name in _PUBLIC_DUNDERS or str(getattr(value, "__module__", "")).startswith("gradscope"):
            exported.add(name)
    assert set(gradscope.__all__) == exported


def test_importing_gradscope_does_not_import_torch() -> None:
    """Reading and diagnosing a run needs no torch (the CLI starts fast); Monitor loads it on first use."""
    code = "import sys, gradscope; assert 'torch' not in sys.modules; gradscope.Monitor; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in gradscope.__all__:
        value = getattr(gradscope, name)
        if callable(value):
            assert (value.__doc__ or "").strip(), f"gradscope.{name} has no docstring"


def test_the_core_contract_names_are_public() -> None:
    assert {"Monitor", "Run", "load", "diagnose", "Finding", "Fix", "GradscopeError"} <= set(gradscope.__all__)


def test_py_typed_is_shipped() -> None:
    assert resources.files("gradscope").joinpath("py.typed").is_file()
    # and the build ships it: the package-data line of pyproject.toml names it
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    package_data = re.search(r"\[tool\.setuptools\.package-data\]\s*gradscope\s*=\s*\[([^\]]*)\]", pyproject)
    assert package_data is not None and '"py.typed"' in package_data.group(1)


def test_a_finding_names_its_layers_as_layers() -> None:
    # nn.Sequential names its layers 0, 1, 2…: bare, they would read as more steps after "at step 5"
    many = gradscope.Finding(code="vanishing_gradients", severity="warning", step=5, layers=("0", "2", "4", "6", "8"), message="m")
    one = gradscope.Finding(code="dead_units", severity="warning", step=5, layers=("2",), message="m")
    assert str(many) == "warning: vanishing_gradients at step 5 [layers 0, 2, 4, 6, …]: m"
    assert str(one) == "warning: dead_units at step 5 [layer 2]: m"
