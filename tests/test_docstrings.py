"""The public API documents every argument: each public function's docstring, and each Cell's
class docstring (constructor) and own ``construct`` docstring, name every parameter of the
signature in an ``Args:`` entry (``name: ...``, or ``a, b: ...`` for several)."""

import inspect
import re

import pytest
from mindspore import nn

import ms_xent
import ms_xent.nn
import ms_xent.ops


def _public_callables():
    found = {}
    for module in (ms_xent, ms_xent.ops, ms_xent.nn):
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isfunction(value):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return sorted(found.items())


PUBLIC = _public_callables()
CELLS = [(name, value) for name, value in PUBLIC
         if inspect.isclass(value) and issubclass(value, nn.Cell)]


def _documented_arguments(docstring):
    """Names that start an ``Args:`` entry: ``name:`` or ``name1, name2:`` at a line's start."""
    names = set()
    for line in (docstring or "").splitlines():
        match = re.match(r"\s*\*{0,2}((?:\w+,\s*)*\w+)(?:\s*\([^)]*\))?:\s", line + " ")
        if match:
            names.update(part.strip() for part in match.group(1).split(","))
    return names


def _undocumented(function, docstring):
    parameters = [name for name in inspect.signature(function).parameters if name != "self"]
    return [name for name in parameters if name not in _documented_arguments(docstring)]


def test_the_public_api_is_found():
    names = {name.rsplit(".", 1)[1] for name, _ in PUBLIC}
    assert {"cross_entropy_loss", "cross_entropy_loss_grad", "cross_entropy_rows",
            "binary_cross_entropy_with_logits", "linear_cross_entropy",
            "vocab_parallel_cross_entropy_rows", "use_backend", "CrossEntropyLoss",
            "BCEWithLogitsLoss", "LinearCrossEntropyLoss"} <= names


@pytest.mark.parametrize("name, function",
                         [(name, value) for name, value in PUBLIC if inspect.isfunction(value)])
def test_function_docstring_names_every_argument(name, function):
    assert function.__doc__, f"{name} has no docstring"
    assert _undocumented(function, function.__doc__) == [], name


@pytest.mark.parametrize("name, cell", CELLS)
def test_cell_docstrings_name_every_argument(name, cell):
    assert cell.__doc__, f"{name} has no docstring"
    assert _undocumented(cell.__init__, cell.__doc__ + (cell.__init__.__doc__ or "")) == [], name
    # help(cell) shows the Cell's own construct, not nn.Cell's generic text.
    assert "construct" in vars(cell), f"{name} does not define construct"
    assert cell.construct.__doc__ and cell.construct.__doc__ != nn.Cell.construct.__doc__, name
    assert _undocumented(cell.construct, cell.construct.__doc__) == [], name
