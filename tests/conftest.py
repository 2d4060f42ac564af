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
# (comma-separated), else the one MS_XENT_BACKEND forces, else the CPU kernels and composed. On CPU
# they can also be "ascend_emulated" (the Ascend-route code with the vendor operators' CPU
# emulator, test infrastructure): `MS_XENT_BACKEND=ascend_emulated python -m pytest -q` runs the
# op, Cell and BCE modules on it with the same oracles and tolerances.
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


# ---- test tiers --------------------------------------------------------------------------------
# `python -m pytest -q` runs the everyday tier (setup.cfg's addopts deselect `slow`); `-m slow` runs
# the rest: msrun, large-memory and long-running tests, and most points of the long option grids.
# They are listed here, in one place, rather than marked in each module, so that test modules stay
# free of tier bookkeeping. Each entry maps a test (path::name, as in its node id) to the parameter
# ids that stay in the everyday tier; every other parametrisation of it is slow (an empty tuple:
# the whole test is slow). What stays covers every public function and Cell, both modes and every
# dtype, on small shapes.
SLOW_TESTS = {
    # ~15 s each: N x C large enough for the kernels' streaming stores.
    "tests/test_cross_entropy_op.py::test_large_gradients_on_the_streaming_store_path": (),
    "tests/test_cross_entropy_op.py::test_seed_example_n4096_c8080_arange_targets": (),
    "tests/test_cross_entropy_op.py::test_graph_and_jit_modes": (
        "w1-ign0.25-eps0.1-z0.02-mean-graph", "w1-ign0.25-eps0.1-z0.02-mean-jit",
        "w1-ign0.0-eps0.1-z0.02-none-graph", "w1-ign0.25-eps0.0-z0.02-sum-jit"),
    # Hypothesis runs of a few hundred examples each (fuzz tests of bad inputs stay).
    "tests/test_fuzz.py::test_fuzz_valid_cross_entropy_calls_match_the_float64_reference": (),
    "tests/test_fuzz.py::test_fuzz_valid_bce_calls_match_the_float64_reference": (),
    "tests/test_fuzz.py::test_fuzz_valid_linear_cross_entropy_calls_match_the_float64_reference": (),
    # Fused linear + CE: 3-9 s per point (graph compiles, two backends); one or two points per
    # backend and mode stay.
    "tests/test_linear_cross_entropy.py::test_options_vs_torch": (
        "cpu_kernel-pynative-everything-mean", "cpu_kernel-graph-everything-none",
        "matmul_chunks-pynative-everything-sum", "matmul_chunks-graph-everything-mean"),
    "tests/test_linear_cross_entropy.py::test_cell_matches_unfused_cross_entropy_loss": (
        "cpu_kernel-graph-everything", "matmul_chunks-pynative-per-token"),
    "tests/test_linear_cross_entropy.py::test_bfloat16_vs_torch": (
        "cpu_kernel-graph-mean", "matmul_chunks-pynative-none"),
    "tests/test_linear_cross_entropy.py::test_cpu_kernel_blocks_on_a_larger_problem": (
        "pynative-7-bfloat16", "pynative-None-float32"),
    "tests/test_linear_cross_entropy.py::test_training_steps_match_the_unfused_model": (
        "cpu_kernel-graph",),
    "tests/test_linear_cross_entropy.py::test_single_row": (
        "cpu_kernel-pynative-mean", "matmul_chunks-pynative-none"),
    "tests/test_linear_cross_entropy.py::test_every_row_ignored_gives_zero_loss_and_gradient": (
        "cpu_kernel-graph", "matmul_chunks-pynative"),
    "tests/test_linear_cross_entropy.py::test_chunk_sizes_agree": (
        "cpu_kernel-1", "matmul_chunks-13"),
    "tests/test_linear_cross_entropy.py::test_no_rows_gives_empty_or_zero_results": (
        "cpu_kernel-graph-sum", "cpu_kernel-pynative-none", "matmul_chunks-pynative-mean"),
    "tests/test_linear_cross_entropy.py::test_forward_without_gradient_matches": (
        "cpu_kernel-graph", "matmul_chunks-pynative"),
    "tests/test_linear_cross_entropy.py::test_bad_target_is_refused_at_run_time_in_graph_mode": (
        "cpu_kernel",),
    # ms_xent.ops.cross_entropy (PyTorch signature): per backend, every layout and target kind
    # with every option on one reduction each, and each dtype and mode once.
    "tests/test_torch_cross_entropy.py::test_layouts_and_options_vs_torch_float64": tuple(
        f"{backend}-{shape}-{kind}-weighted-smoothed-ignored-{reduction}"
        for backend in ("cpu", "composed") for kind in ("index", "soft")
        for shape, reduction in (("C", "none"), ("NC", "mean"), ("NCd", "sum"), ("NCdd", "none"))
    ) + ("cpu-NCd-index-ignore-a-class-mean", "composed-NCdd-index-ignore-a-class-none"),
    "tests/test_torch_cross_entropy.py::test_modes_and_dtypes_vs_torch_float64": (
        "cpu-index-bfloat16-graph", "composed-index-float32-graph", "cpu-soft-float32-graph",
        "composed-soft-bfloat16-pynative", "cpu-index-float16-pynative",
        "composed-soft-float16-pynative"),
    # ~20 s: a fresh interpreter importing MindFormers.
    "tests/test_mindformers_registry.py::test_import_writes_nothing_to_the_working_directory": (),
    # The benchmark scripts end to end: 1-3 minutes each on a busy machine; not public API.
    "tests/test_scripts.py::test_bench_reports_every_case_with_correct_losses": (),
    "tests/test_scripts.py::test_bench_kernels_prints_a_row_per_case": (),
    "tests/test_scripts.py::test_bench_linear_cross_entropy_reports_fused_and_unfused": (),
    # mcore loss parity in GRAPH mode, ~3 s per case: the random-mask, ignored-label and
    # all-masked cases stay, both outputs.
    "tests/test_mindformers_mcore.py::test_parity_with_mindformers_mcore_loss_graph_mode": (
        "b2_s8_v64_random_mask-mean", "b1_s16_v1000_ignored_labels-per_token",
        "b2_s4_v32_all_masked-per_token"),
    # Tiny Llama through MindFormers: 5-65 s each (model build, graph compile, several steps);
    # GRAPH-mode parity of the forward and gradients stays (training steps against MindFormers'
    # loss: test_mindformers_registry's step-by-step test).
    "tests/test_mindformers_training.py::test_trainer_route_gives_the_model_route_result": (),
    "tests/test_mindformers_training.py::test_train_script_trains_and_exits_zero": (),
    "tests/test_mindformers_training.py::test_training_steps_match_mindformers_loss": (),
    "tests/test_mindformers_training.py::test_forward_and_gradients_match_mindformers_llama": (
        "graph",),
    "tests/test_mindformers_training.py::test_fused_linear_loss_from_yaml_matches_the_logits_loss": (
        "pynative",),
    "tests/test_mindformers_training.py::test_train_step_cell_reports_non_finite_gradients": (
        "pynative",),
    "tests/test_mindformers_training.py::test_training_loss_matches_float64_oracle_with_options": (
        "pynative",),
}

# Tests that need MindFormers although their module imports without it (the modules that import
# it are listed in .ci/run, whose MindSpore 2.10 leg runs without MindFormers).
NEEDS_MINDFORMERS = (
    "tests/test_vocab_parallel.py::test_semi_auto_parallel_sets_the_strategies_of_mindformers_loss",
    "tests/test_scripts.py::",
)


def _kept_fast(item, kept_ids):
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.id in kept_ids


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection
def pytest_collection_modifyitems(items):
    for item in items:
        name = item.nodeid.split("[", 1)[0]
        if name in SLOW_TESTS and not _kept_fast(item, SLOW_TESTS[name]):
            item.add_marker(pytest.mark.slow)
        if item.nodeid.startswith(NEEDS_MINDFORMERS):
            item.add_marker(pytest.mark.mindformers)
