"""Test session setup: keep MindSpore's and MindFormers' files out of the working directory."""

import os
import tempfile

import pytest

_SCRATCH = tempfile.mkdtemp(prefix="ms_xent_tests_")
os.environ.setdefault("LOG_MF_PATH", os.path.join(_SCRATCH, "mindformers_log"))
os.environ.setdefault("OM_MODULES_CACHE", os.path.join(_SCRATCH, "modules"))
# MindSpore writes rank_*/om/analyze_fail.ir for graphs that fail to compile (the bad-input
# tests do that on purpose) under MS_OM_PATH, or the working directory without it.
os.environ.setdefault("MS_OM_PATH", os.path.join(_SCRATCH, "om"))
# Hypothesis keeps caches (e.g. .hypothesis/constants) in the working directory unless told
# otherwise; the fuzz tests use no example database (derandomized).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_SCRATCH, "hypothesis"))

import mindspore as ms  # noqa: E402  (after the environment above: MindSpore reads it on import)

import ms_xent  # noqa: E402

MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
# The backends the modules marked with the `backend` fixture run over: MS_XENT_TEST_BACKENDS
# (comma-separated), else the one MS_XENT_BACKEND forces, else both CPU-capable backends.
BACKENDS = tuple(name.strip() for name in os.environ.get(
    "MS_XENT_TEST_BACKENDS", os.environ.get("MS_XENT_BACKEND", "cpu,composed")).split(",")
    if name.strip() and name.strip() != "auto") or ("cpu", "composed")


@pytest.fixture(autouse=True)
def restore_mode():
    """Every test starts and ends in PYNATIVE_MODE, whatever mode it switched to."""
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(params=tuple(MODES), name="mode")
def mode_fixture(request):
    """Runs the test once per execution mode; the value is the mode's name."""
    ms.set_context(mode=MODES[request.param])
    return request.param


@pytest.fixture(params=BACKENDS, name="backend")
def backend_fixture(request):
    """Runs the test once per backend (``ms_xent.use_backend``); the value is its name."""
    with ms_xent.use_backend(request.param):
        yield request.param
