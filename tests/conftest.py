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
DEFAULT_BACKENDS = ("cpu", "composed")
BACKENDS = tuple(name.strip() for name in os.environ.get(
    "MS_XENT_TEST_BACKENDS", os.environ.get("MS_XENT_BACKEND", ",".join(DEFAULT_BACKENDS))).split(",")
    if name.strip() and name.strip() != "auto") or DEFAULT_BACKENDS


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
# the rest: msrun, large-memory and long-running tests, the long option grids and the second
# backend's repetitions of them. The tiers are listed here, in one place, rather than marked in each
# module, so that test modules stay free of tier bookkeeping. Two tables, each mapping a test
# (path::name, as in its node id) to the parameter ids of it that stay in the everyday tier (an
# empty tuple: none, ALL: every one), ids written without the backend's part ("graph-mean", not
# "cpu-graph-mean"), so that they hold whichever backends the tests run on:
# - SLOW_TESTS: every point of a listed test that is not kept is slow; unlisted tests stay whole.
# - EVERYDAY_ON_OTHER_BACKENDS: a test over the `backend` fixture runs its everyday points on the
#   first test backend (cpu); a listed test keeps only the points listed here on the others
#   (composed), where the rest of it is slow; an unlisted test keeps the same points on each.
# What stays covers every public function and Cell, both modes and every dtype on small shapes, on
# each backend. Every listed test and id must match a collected test (checked at collection), so
# that a renamed test or parameter fails loudly instead of silently moving coverage.
ALL = "every point"

SLOW_TESTS = {
    # ms_xent.ops.cross_entropy_loss / _grad / cross_entropy_rows: each option value with each
    # reduction, each half dtype and the GRAPH and jit modes on a few points of the option grid.
    "tests/test_cross_entropy_op.py::test_every_option_float32_pynative_vs_numpy_and_torch": (
        "w0-ign0.0-eps0.0-z0.0-mean", "w0-ign0.0-eps0.0-z0.0-none", "w0-ign0.0-eps0.1-z0.02-none",
        "w0-ign0.25-eps0.0-z0.0-mean", "w0-ign0.25-eps0.1-z0.02-sum", "w1-ign0.0-eps0.0-z0.02-mean",
        "w1-ign0.0-eps0.1-z0.0-sum", "w1-ign0.25-eps0.0-z0.02-none", "w1-ign0.25-eps0.1-z0.0-none",
        "w1-ign0.25-eps0.1-z0.02-mean", "w1-ign0.25-eps0.1-z0.02-sum",
        "w1-ign0.25-eps0.1-z0.02-none"),
    "tests/test_cross_entropy_op.py::test_half_dtypes_vs_numpy": (
        "w1-ign0.25-eps0.1-z0.02-mean-float16", "w1-ign0.25-eps0.1-z0.02-mean-bfloat16",
        "w0-ign0.0-eps0.0-z0.02-none-float16", "w0-ign0.25-eps0.1-z0.0-none-bfloat16",
        "w0-ign0.0-eps0.1-z0.02-sum-float16", "w1-ign0.0-eps0.0-z0.0-sum-bfloat16"),
    "tests/test_cross_entropy_op.py::test_graph_and_jit_modes": (
        "w1-ign0.25-eps0.1-z0.02-mean-graph", "w0-ign0.0-eps0.0-z0.02-none-jit",
        "w1-ign0.25-eps0.0-z0.02-sum-graph"),
    "tests/test_cross_entropy_op.py::test_logit_scale_and_softcap_vs_torch_float64": tuple(
        f"{reduction}-{scale_and_cap}-pynative" for reduction in ("mean", "sum", "none")
        for scale_and_cap in ("0.5-0.0", "1.0-30.0", "-2.0-5.0", "3.0-2.0")
    ) + ("mean-3.0-2.0-graph",),
    "tests/test_cross_entropy_op.py::test_gradient_wrt_probability_targets_vs_torch_float64": tuple(
        f"{weighted_and_smoothing}-{reduction}-pynative"
        for weighted_and_smoothing in ("False-0.0", "True-0.2")
        for reduction in ("mean", "sum", "none")) + ("True-0.2-mean-graph",),
    "tests/test_cross_entropy_op.py::test_all_rows_ignored_gives_zero_not_nan": (
        "mean-pynative", "sum-pynative", "none-pynative", "mean-graph"),
    # ~15 s each: N x C large enough for the kernels' streaming stores.
    "tests/test_cross_entropy_op.py::test_large_gradients_on_the_streaming_store_path": (),
    "tests/test_cross_entropy_op.py::test_seed_example_n4096_c8080_arange_targets": (),
    # ms_xent.ops.cross_entropy (PyTorch signature): every layout and target kind with every option
    # on one reduction each; each dtype in PYNATIVE, GRAPH on float32 and bfloat16.
    "tests/test_torch_cross_entropy.py::test_layouts_and_options_vs_torch_float64": tuple(
        f"{shape}-{kind}-weighted-smoothed-ignored-{reduction}" for kind in ("index", "soft")
        for shape, reduction in (("C", "none"), ("NC", "mean"), ("NCd", "sum"), ("NCdd", "none"))
    ) + ("NCd-index-ignore-a-class-mean",),
    "tests/test_torch_cross_entropy.py::test_modes_and_dtypes_vs_torch_float64": (
        "index-float32-pynative", "soft-float16-pynative", "index-bfloat16-pynative",
        "soft-bfloat16-graph"),
    "tests/test_torch_cross_entropy.py::test_every_position_ignored_gives_zero_with_zero_gradient": (
        "pynative",),
    # The Cells: every option in PYNATIVE, the GRAPH runs that use all of them.
    "tests/test_cross_entropy_loss_cell.py::test_options_vs_torch": (
        "pynative-weight", "pynative-ignore-index-3", "pynative-smoothing", "pynative-zloss",
        "pynative-all-mean", "pynative-all-sum", "pynative-all-none", "pynative-soft",
        "graph-all-none"),
    "tests/test_cross_entropy_loss_cell.py::test_z_loss_token_accuracy_and_predicted_tokens_vs_torch": (
        "pynative-mean-all-extras", "pynative-sum-zloss-accuracy", "pynative-none-all-extras",
        "pynative-per-token-all-extras", "pynative-soft-zloss-predicted",
        "graph-per-token-all-extras"),
    "tests/test_cross_entropy_loss_cell.py::test_leading_dims_are_flattened": (
        "pynative-class-indices", "pynative-probabilities"),
    "tests/test_cross_entropy_loss_cell.py::test_nan_check_raises_naming_the_loss_and_the_rows": (
        "pynative-nan", "pynative-inf", "graph-nan"),
    "tests/test_cross_entropy_loss_cell.py::test_matches_mindformers_float32": (
        "pynative-masked", "pynative-unmasked-256x1000", "graph-all-masked"),
    # Fused linear + CE: every option in PYNATIVE on the oneDNN kernel, GRAPH once; the row chunks
    # (a graph compile per option set even in PYNATIVE) on the options all at once.
    "tests/test_linear_cross_entropy.py::test_options_vs_torch": tuple(
        f"pynative-{case}-kernel"
        for case in ("mean", "ignore-index-and-class-weight", "label-smoothing", "zloss",
                     "softcap", "scale", "bias", "input-mask", "sum", "none", "per-token",
                     "everything-mean", "everything-none", "everything-sum")
    ) + ("pynative-everything-none-chunks", "pynative-per-token-chunks",
         "graph-everything-none-kernel"),
    "tests/test_linear_cross_entropy.py::test_cell_matches_unfused_cross_entropy_loss": (
        "pynative-everything-kernel", "pynative-per-token-kernel", "pynative-none-kernel",
        "graph-everything-kernel"),
    "tests/test_linear_cross_entropy.py::test_bfloat16_vs_torch": (
        "pynative-mean-kernel", "pynative-none-chunks", "graph-mean-kernel"),
    "tests/test_linear_cross_entropy.py::test_float16_vs_torch": (
        "mean-kernel", "none-kernel", "none-chunks"),
    "tests/test_linear_cross_entropy.py::test_cpu_kernel_blocks_on_a_larger_problem": (
        "pynative-7-bfloat16", "pynative-None-float32"),
    "tests/test_linear_cross_entropy.py::test_training_steps_match_the_unfused_model": (
        "pynative-kernel",),
    "tests/test_linear_cross_entropy.py::test_single_row": (
        "pynative-mean-kernel", "pynative-none-chunks"),
    "tests/test_linear_cross_entropy.py::test_every_row_ignored_gives_zero_loss_and_gradient": (
        "pynative-kernel",),
    "tests/test_linear_cross_entropy.py::test_chunk_sizes_agree": tuple(
        f"{chunk}-kernel" for chunk in ("None", "1", "5", "13", "100")),
    "tests/test_linear_cross_entropy.py::test_no_rows_gives_empty_or_zero_results": tuple(
        f"pynative-{reduction}-{implementation}" for reduction in ("mean", "sum", "none")
        for implementation in ("kernel", "chunks")),
    "tests/test_linear_cross_entropy.py::test_forward_without_gradient_matches": (
        "pynative-kernel",),
    "tests/test_linear_cross_entropy.py::test_bad_target_is_refused_at_run_time_in_graph_mode": (
        "kernel",),
    "tests/test_linear_cross_entropy.py::test_second_order_raises": (
        "pynative-mean-kernel", "pynative-none-chunks"),
    "tests/test_linear_cross_entropy.py::test_batch_dims_shift_and_extra_outputs_vs_torch": tuple(
        f"pynative-{case}-kernel"
        for case in ("mean", "sum-shift", "none-shift", "per-token", "mean-class-weight-shift")
    ),
    "tests/test_linear_cross_entropy.py::test_composed_row_chunks_match_the_cpu_kernel": (
        "pynative",),
    "tests/test_linear_cross_entropy.py::test_cell_flattens_leading_dims": ("pynative",),
    "tests/test_linear_cross_entropy.py::test_cpu_kernel_accuracy_on_offset_and_confident_rows": (
        "pynative-offset-1e6", "pynative-offset-3e38", "pynative-confident-1e-7"),
    # Vocab-parallel in one process: every case in PYNATIVE, GRAPH and jit once each.
    "tests/test_vocab_parallel.py::test_world_size_one_matches_single_device": tuple(
        f"{case}-pynative" for case in ("all_options", "soft_targets", "confident_and_offset_rows",
                                        "bfloat16")) + ("all_options-graph", "bfloat16-jit"),
    # Accuracy at offsets and on confident rows: every public function at the two extremes in
    # PYNATIVE, the grad op and cross_entropy_rows in GRAPH at one of them (the other functions'
    # GRAPH mode is in their own modules).
    "tests/test_numerics.py::test_accuracy_against_float64_at_offsets_and_on_confident_rows": tuple(
        f"{case}-{api}-pynative" for case in ("offset 3e+38", "p_y = 1 - 1e-07")
        for api in ("CrossEntropyLoss", "cross_entropy_loss", "cross_entropy_loss_grad",
                    "cross_entropy_rows", "vocab_parallel_cross_entropy_rows")
    ) + ("offset 1e+30-cross_entropy_loss_grad-graph", "p_y = 1 - 1e-07-cross_entropy_rows-graph"),
    "tests/test_numerics.py::test_composed_backend_has_the_same_accuracy": tuple(
        f"{case}-{api}" for case, api in (
            ("offset 3e+38", "CrossEntropyLoss"), ("p_y = 1 - 1e-07", "cross_entropy_loss"),
            ("offset 1e+30", "cross_entropy_loss_grad"), ("p_y = 1 - 0.0001", "cross_entropy_rows"),
            ("offset 3e+38", "vocab_parallel_cross_entropy_rows"))),
    "tests/test_numerics.py::test_mean_with_a_negative_weight_sum_divides_by_it": ("pynative",),
    "tests/test_numerics.py::test_denormal_weights_with_mean": ("pynative",),
    "tests/test_numerics.py::test_weights_whose_sum_overflows_float32": (
        "mean-pynative", "none-pynative", "none-graph"),
    "tests/test_numerics.py::test_cells_weighted_mean_with_extreme_weights": tuple(
        f"{cell}-{scale}-pynative" for cell in ("CrossEntropyLoss", "LinearCrossEntropyLoss")
        for scale in ("huge", "denormal")) + ("CrossEntropyLoss-huge-graph",),
    "tests/test_numerics.py::test_negative_weights_follow_pytorch": (
        "0.0-mean-pynative", "0.1-sum-pynative", "0.1-none-pynative", "0.1-mean-graph"),
    "tests/test_regressions.py::test_weight_with_label_smoothing_and_ignore_index_does_not_crash": (
        "pytorch72056-none",),
    "tests/test_regressions.py::test_int32_and_int64_targets_give_identical_results": (
        "float32-pynative", "bfloat16-pynative"),
    # GRAPH mode of these is in the slow tier; the refusal in GRAPH mode is tested above.
    "tests/test_regressions.py::test_second_order_and_jvp_of_the_cpu_kernels_raise_clearly": (
        "pynative-cross_entropy_loss", "pynative-binary_cross_entropy_with_logits"),
    "tests/test_regressions.py::test_probability_target_with_a_class_ignore_index_raises": (
        "pynative-0", "graph-3"),
    "tests/test_regressions.py::test_probability_target_with_a_negative_ignore_index_follows_pytorch": (
        "pynative--100", "pynative--1", "graph--1"),
    "tests/test_regressions.py::test_signed_class_weights_in_linear_cross_entropy": ("pynative",),
    "tests/test_regressions.py::test_empty_batch_gives_exact_zero_not_reduce_sum_garbage": (),
    "tests/test_regressions.py::test_all_targets_ignored_mean_gives_zero_not_nan": (
        "float32-pynative", "bfloat16-pynative"),
    # The composed route of the Ascend path: each option value on one reduction each.
    "tests/test_ascend_path.py::test_composed_route_float32_vs_kernel_numpy_torch": (
        "w0-ign1-eps1-z1-none", "w1-ign0-eps1-z1-sum", "w1-ign1-eps0-z1-mean",
        "w1-ign1-eps1-z0-none"),
    "tests/test_ascend_path.py::test_bce_routes_vs_torch": (
        "pynative-composed-True", "graph-ascend_builtin-False"),
    "tests/test_ascend_path.py::test_ignored_rows_of_minus_inf_logits_match_kernel": ("options0",),
    # Hypothesis runs of a few hundred examples each (fuzz tests of bad inputs stay).
    "tests/test_fuzz.py::test_fuzz_valid_cross_entropy_calls_match_the_float64_reference": (),
    "tests/test_fuzz.py::test_fuzz_valid_bce_calls_match_the_float64_reference": (),
    "tests/test_fuzz.py::test_fuzz_valid_linear_cross_entropy_calls_match_the_float64_reference": (),
    # ~20 s: a fresh interpreter importing MindFormers.
    "tests/test_mindformers_registry.py::test_import_writes_nothing_to_the_working_directory": (),
    # The benchmark scripts end to end: 1-3 minutes each on a busy machine; not public API.
    "tests/test_scripts.py::test_bench_reports_every_case_with_correct_losses": (),
    "tests/test_scripts.py::test_bench_kernels_prints_a_row_per_case": (),
    "tests/test_scripts.py::test_bench_linear_cross_entropy_reports_fused_and_unfused": (),
    # mcore loss parity (GRAPH mode only), ~3 s per case: the random-mask case with the per-token
    # output and the all-masked case with the mean stay.
    "tests/test_mindformers_mcore.py::test_parity_with_mindformers_mcore_loss_graph_mode": (
        "b2_s8_v64_random_mask-per_token", "b2_s4_v32_all_masked-mean"),
    "tests/test_mindformers_mcore.py::test_parity_with_bfloat16_logits_as_the_mtp_block_passes_them": (),
    # Qwen3, DeepSeek-V3 and Qwen3-MoE built from tiny configs in a subprocess (~30 s).
    "tests/test_mindformers_mcore.py::test_qwen3_model_uses_the_loss_of_its_config": (),
    "tests/test_mindformers_mcore.py::test_model_without_loss_config_uses_ms_xent_defaults": (),
    "tests/test_mindformers_mcore.py::test_mindformers_own_qwen3_keeps_its_loss": (),
    "tests/test_mindformers_mcore.py::test_deepseek_v3_replaces_the_language_model_and_mtp_losses": (),
    "tests/test_mindformers_mcore.py::test_qwen3_moe_model_uses_the_loss_of_its_config": (),
    "tests/test_mindformers_mcore.py::test_the_loss_the_model_holds_matches_mindformers_loss": (),
    "tests/test_mindformers_mcore.py::test_run_mode_predict_and_pynative_are_refused_by_name": (),
    # ~25 s: a fresh interpreter importing MindFormers.
    "tests/test_quiet_import.py::test_import_prints_nothing_and_logs_the_import_warnings": (),
    # The Ascend route's composed fallback: GRAPH on one dtype, dynamic batch in the slow tier.
    "tests/test_ascend_path.py::test_composed_route_dtypes_modes_and_soft_targets": (
        "bf16-all-options", "graph-bf16-soft-zloss"),
    "tests/test_ascend_path.py::test_composed_route_graph_dynamic_batch": (),
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
EVERYDAY_ON_OTHER_BACKENDS = {
    # The op and its grad, cross_entropy_rows: both modes, every dtype, the option values.
    "tests/test_cross_entropy_op.py::test_every_option_float32_pynative_vs_numpy_and_torch": (
        "w0-ign0.0-eps0.0-z0.0-none", "w1-ign0.25-eps0.1-z0.02-mean"),
    "tests/test_cross_entropy_op.py::test_half_dtypes_vs_numpy": (
        "w1-ign0.25-eps0.1-z0.02-mean-float16", "w0-ign0.25-eps0.1-z0.0-none-bfloat16"),
    "tests/test_cross_entropy_op.py::test_graph_and_jit_modes": (),
    "tests/test_cross_entropy_op.py::test_logit_scale_and_softcap_vs_torch_float64": (
        "mean-3.0-2.0-pynative",),
    "tests/test_cross_entropy_op.py::test_gradient_wrt_probability_targets_vs_torch_float64": (
        "True-0.2-none-pynative",),
    "tests/test_cross_entropy_op.py::test_all_rows_ignored_gives_zero_not_nan": (
        "none-pynative",),
    "tests/test_cross_entropy_op.py::test_shapes": ("1-1", "3-17", "257-33"),
    "tests/test_cross_entropy_op.py::test_probability_targets": ("float32-mean", "bfloat16-none"),
    "tests/test_cross_entropy_op.py::test_cross_entropy_loss_grad_from_log_prob": (
        "mean-float32", "sum-float16", "none-bfloat16"),
    "tests/test_cross_entropy_op.py::test_argmax_output_gives_predicted_tokens_and_token_accuracy": (
        "int64-pynative", "int32-graph"),
    "tests/test_cross_entropy_op.py::test_logit_softcap_on_cross_entropy_rows_and_half_dtypes": (
        "bfloat16",),
    "tests/test_cross_entropy_op.py::test_dynamic_batch_size_in_graph_mode": (),
    # ms_xent.ops.cross_entropy (PyTorch signature).
    "tests/test_torch_cross_entropy.py::test_layouts_and_options_vs_torch_float64": (
        "NC-index-weighted-smoothed-ignored-mean", "NCdd-soft-weighted-smoothed-ignored-none"),
    "tests/test_torch_cross_entropy.py::test_modes_and_dtypes_vs_torch_float64": (
        "soft-bfloat16-pynative", "index-float16-pynative"),
    # CrossEntropyLoss.
    "tests/test_cross_entropy_loss_cell.py::test_options_vs_torch": (
        "pynative-all-mean", "pynative-soft", "graph-all-none"),
    "tests/test_cross_entropy_loss_cell.py::test_z_loss_token_accuracy_and_predicted_tokens_vs_torch": (
        "pynative-per-token-all-extras", "pynative-soft-zloss-predicted"),
    "tests/test_cross_entropy_loss_cell.py::test_leading_dims_are_flattened": (
        "pynative-probabilities",),
    "tests/test_cross_entropy_loss_cell.py::test_nan_check_raises_naming_the_loss_and_the_rows": (
        "pynative-nan",),
    "tests/test_cross_entropy_loss_cell.py::test_nan_check_passes_finite_loss_through": (
        "pynative",),
    "tests/test_cross_entropy_loss_cell.py::test_matches_mindformers_float32": ("pynative-masked",),
    "tests/test_cross_entropy_loss_cell.py::test_per_token_output_matches_mindformers": (
        "pynative-seq-split",),
    "tests/test_cross_entropy_loss_cell.py::test_recorded_token_accuracy_without_changing_the_output": (),
    "tests/test_cross_entropy_loss_cell.py::test_z_loss_scale_of_one_and_more_is_accepted": (
        "pynative",),
    "tests/test_cross_entropy_loss_cell.py::test_token_accuracy_monitor_reads_each_step_of_model_train": (),
    "tests/test_cross_entropy_loss_cell.py::test_half_precision_vs_torch": (
        "class-indices-float16", "probabilities-bfloat16"),
    "tests/test_cross_entropy_loss_cell.py::test_half_precision_logits_match_mindformers": (
        "bfloat16",),
    "tests/test_cross_entropy_loss_cell.py::test_dynamic_shapes_in_graph_mode": (),
    # BCE op and Cell.
    "tests/test_bce_with_logits.py::test_matches_torch_pynative": (
        "7-w_absent-pw_absent-none-float32", "7-w_scalar-pw_scalar-mean-float16",
        "7-w_last-pw_last-sum-bfloat16", "3x17-w_last-pw_full-mean-float32",
        "2x3x5-w_full-pw_last-none-float16", "4x1x33-w_full-pw_full-2-bfloat16"),
    "tests/test_bce_with_logits.py::test_cell_in_graph_mode": ("shape1-middle-full-0-bfloat16",),
    "tests/test_bce_with_logits.py::test_extreme_logits_match_torch": (
        "True-float32", "False-bfloat16", "True-float16"),
    "tests/test_bce_with_logits.py::test_dynamic_shapes_in_graph_mode": (),
    # Vocab-parallel in one process.
    "tests/test_vocab_parallel.py::test_world_size_one_matches_single_device": (
        "all_options-pynative", "soft_targets-graph"),
    "tests/test_vocab_parallel.py::test_target_outside_vocabulary_gives_nan_in_graph_and_error_in_pynative": (
        "1",),
    # Fused linear + CE (the row chunks over the composed per-row cross-entropy).
    "tests/test_linear_cross_entropy.py::test_options_vs_torch": (
        "pynative-everything-none-chunks",),
    "tests/test_linear_cross_entropy.py::test_cell_matches_unfused_cross_entropy_loss": (
        "pynative-everything-chunks",),
    "tests/test_linear_cross_entropy.py::test_no_rows_gives_empty_or_zero_results": (
        "pynative-mean-chunks",),
    "tests/test_linear_cross_entropy.py::test_second_order_raises": (),
    "tests/test_linear_cross_entropy.py::test_single_row": (),
    "tests/test_linear_cross_entropy.py::test_float16_vs_torch": (),
    # Regressions over both backends.
    "tests/test_regressions.py::test_bf16_logits_with_leading_dims_in_the_cells": (),
    "tests/test_regressions.py::test_signed_class_weights_in_the_cross_entropy_cell": ("pynative",),
    "tests/test_regressions.py::test_signed_class_weights_in_linear_cross_entropy": (),
    "tests/test_regressions.py::test_int32_targets_with_ignore_index_beyond_int32_linear": (
        "4294967296",),
    "tests/test_regressions.py::test_cells_mean_with_a_zero_weight_sum_is_zero": (
        "CrossEntropyLoss",),
    "tests/test_regressions.py::test_dynamic_rank_bce_runs": (),
    "tests/test_regressions.py::test_dynamic_rank_raises_a_clear_error": (),
}

# Tests that need MindFormers although their module imports without it (the modules that import
# it are listed in .ci/run, whose MindSpore 2.10 leg runs without MindFormers).
NEEDS_MINDFORMERS = (
    "tests/test_vocab_parallel.py::test_semi_auto_parallel_sets_the_strategies_of_mindformers_loss",
    "tests/test_scripts.py::",
)


def _test_name_and_id(item):
    """(path::name, the parameter id without the backend's part)."""
    name = item.nodeid.split("[", 1)[0]
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return name, ""
    parts = callspec.id.split("-")
    if callspec.params.get("backend") in parts:
        parts.remove(callspec.params["backend"])
    return name, "-".join(parts)


def _on_other_backend(item):
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("backend", BACKENDS[0]) != BACKENDS[0]


def _is_slow(item):
    name, point = _test_name_and_id(item)
    kept = SLOW_TESTS.get(name, ALL)
    if _on_other_backend(item):
        kept = EVERYDAY_ON_OTHER_BACKENDS.get(name, kept)
    return kept != ALL and point not in kept


def _check_tier_lists(config, items):
    """Every test and id of the tier lists must match a collected test, when whole modules were
    collected over the default backends (a node id or --last-failed on the command line narrows
    the collection; a run forced onto other backends, e.g. MS_XENT_BACKEND=composed, does not
    generate the ids that exist only for the others, such as the CPU kernel's linear CE)."""
    if (BACKENDS != DEFAULT_BACKENDS or config.getoption("lf", False)
            or any("::" in arg for arg in config.args)):
        return
    collected = {}
    for item in items:
        name, point = _test_name_and_id(item)
        collected.setdefault(name, set()).add(point)
    modules = {name.split("::", 1)[0] for name in collected}
    stale = []
    for table_name, table in (("SLOW_TESTS", SLOW_TESTS),
                              ("EVERYDAY_ON_OTHER_BACKENDS", EVERYDAY_ON_OTHER_BACKENDS)):
        for name, kept in table.items():
            if name.split("::", 1)[0] not in modules:
                continue
            if name not in collected:
                stale.append(f"{table_name}: no test {name}")
            elif kept != ALL:
                stale.extend(f"{table_name}: {name} has no parameter id {point!r}"
                             for point in kept if point not in collected[name])
    if stale:
        raise pytest.UsageError("tests/conftest.py lists tests or ids that were not collected:\n"
                                + "\n".join(stale))


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection
def pytest_collection_modifyitems(config, items):
    _check_tier_lists(config, items)
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
        if item.nodeid.startswith(NEEDS_MINDFORMERS):
            item.add_marker(pytest.mark.mindformers)
