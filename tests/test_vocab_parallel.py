"""Vocabulary-parallel cross-entropy: ms_xent.ops.vocab_parallel_cross_entropy_rows (and the
CrossEntropyLoss Cell's parallel paths).

- Single process (world size 1, no collective): the functional API against cross_entropy_rows
  and the float64 numpy oracle, every option, PYNATIVE / GRAPH / ms.jit; bad input. The Cell:
  model_parallel without communication, and the shard strategies it sets under
  SEMI_AUTO_PARALLEL (construction only: CPU cannot compile that mode), compared with
  MindFormers' own loss.
- msrun with 2 CPU workers (slow; one launch for every distributed case): the loss and the
  gradient put together from the ranks against a single-process run of the same objective
  (<= 1e-6 relative in float32) and against the float64 oracle, in PYNATIVE and GRAPH mode.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn
from mindspore.context import ParallelMode

from ms_xent._backends import dispatch
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.ops import cross_entropy_rows, vocab_parallel_cross_entropy_rows
from tests.distributed import vocab_parallel_worker as worker
from tests.distributed.msrun import run_msrun
from tests.reference import (TOLERANCE, assert_close, assert_close_to_peak, numpy_cross_entropy,
                             rounded)

# Every test runs on each backend (tests/conftest.py `backend`: cpu and composed).
pytestmark = pytest.mark.usefixtures("backend")

WORKER = Path(worker.__file__)
# Distributed vs single-process ms_xent (same kernels, same float32 inputs).
PARITY_RTOL = {"float32": 1e-6, "bfloat16": TOLERANCE[ms.bfloat16][0]}
# The composed backend's single-device bprop takes the softmax from MindSpore's fused Softmax
# kernel, its vocabulary-parallel backward from exp((x - m) - log_sum) with the combined shift:
# two float32 evaluations of the same softmax, a few ulp apart (up to 4.6e-6 seen).
COMPOSED_PARITY_RTOL = {"float32": 1e-5, "bfloat16": TOLERANCE[ms.bfloat16][0]}
# Checked on its own (+inf loss rows): loss differences with inf are NaN.
MINUS_INF_CASE = "minus_inf_target_slice"


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are all zeros)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max() if expected.size else 0.0
    diff = np.abs(actual - expected).max() if expected.size else 0.0
    return diff / scale if scale > 0 else diff


def full_tensors(case):
    x, target, weight, mask = worker.make_inputs(case)
    logits, target_t, weight_t = worker.to_tensors(case, x, target, weight)
    return logits, target_t, weight_t, ms.Tensor(mask)


def single_process(case):
    """The case's objective on the whole logits with ms_xent's single-device op (PYNATIVE)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    logits, target, weight, mask = full_tensors(case)

    def row_losses(x, t):
        return cross_entropy_rows(x, t, weight, worker.IGNORE_INDEX, case.label_smoothing)

    return worker.value_and_grad(worker.RowsObjective(row_losses, case.zloss), logits, target,
                                 mask)


def oracle(case):
    """float64 numpy value and gradient of the objective (inputs rounded to the case dtype)."""
    x, target, weight, mask = worker.make_inputs(case)
    dtype = worker.DTYPES[case.dtype]
    x = rounded(x, dtype)
    if case.soft:
        target = rounded(target, dtype)
    ref = numpy_cross_entropy(x, target, weight, "none", worker.IGNORE_INDEX,
                              case.label_smoothing)
    if case.soft:
        counted = np.ones(case.n_rows)
        row_weight = counted
    else:
        w = np.ones(case.n_classes) if weight is None else weight.astype(np.float64)
        counted = (target != worker.IGNORE_INDEX).astype(np.float64)
        row_weight = np.where(counted > 0, w[np.where(counted > 0, target, 0)], 0.0)
    lse, prob = ref["lse"], np.exp(ref["log_prob"])
    # The z-loss is unweighted, over the counted rows, with its own denominator.
    denominator = (row_weight * mask).sum() + 1e-8
    z_denominator = (counted * mask).sum() + 1e-8
    loss = ((mask * ref["loss"]).sum() / denominator
            + (mask * counted * case.zloss * lse ** 2).sum() / z_denominator)
    zloss_grad = (2 * case.zloss * counted * lse)[:, None] * prob / z_denominator
    grad = mask[:, None] * (ref["grad"] / denominator + zloss_grad)
    return {"loss": loss, "loss_rows": ref["loss"], "lse": lse, "row_weight": row_weight,
            "grad": grad}


def check_against_references(result, case, what):
    """``result`` (loss, per-row values, full gradient) vs the single-process run and the oracle."""
    single, exact = single_process(case), oracle(case)
    dtype = worker.DTYPES[case.dtype]
    composed = dispatch.requested_backend() == dispatch.COMPOSED
    rtol = (COMPOSED_PARITY_RTOL if composed else PARITY_RTOL)[case.dtype]
    per_row = ("loss_rows", "lse", "row_weight") if case.api == "rows" else ()
    for name in ("loss", "grad") + per_row:
        error = relative_error(result[name], single[name])
        assert error <= rtol, f"{what}: {name} differs from the single-process run by {error:.3g}"
    assert_close(result["loss"], exact["loss"], dtype, f"{what}: loss vs float64 oracle")
    for name in per_row[:2]:
        assert_close(result[name], exact[name], dtype, f"{what}: {name} vs float64 oracle")
    assert_close_to_peak(result["grad"], exact["grad"], dtype, f"{what}: grad vs oracle")


# ---- single process: world size 1, no collective ------------------------------------------------

def world_one_objective(case, weight):
    def row_losses(x, t):
        return vocab_parallel_cross_entropy_rows(x, t, weight, worker.IGNORE_INDEX,
                                                 case.label_smoothing)
    return worker.RowsObjective(row_losses, case.zloss)


@pytest.mark.parametrize("mode", ["pynative", "graph", "jit"])
@pytest.mark.parametrize("name", [name for name, case in worker.CASES.items()
                                  if case.api == "rows" and not case.shards
                                  and name != MINUS_INF_CASE])
def test_world_size_one_matches_single_device(name, mode):
    case = worker.CASES[name]
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    logits, target, weight, mask = full_tensors(case)
    objective = world_one_objective(case, weight)
    if mode == "jit":
        objective = ms.jit(objective.construct)
    result = worker.value_and_grad(objective, logits, target, mask)
    check_against_references(result, case, f"{name} ({mode}, world size 1)")


class LossRows(nn.Cell):
    def construct(self, logits, target):
        return vocab_parallel_cross_entropy_rows(logits, target)[0]


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_target_outside_vocabulary_gives_nan_in_graph_and_error_in_pynative(mode):
    ms.set_context(mode=mode)
    logits = ms.Tensor(np.zeros((3, 4), np.float32))
    target = ms.Tensor(np.array([1, 4, -100], np.int64))
    if mode == ms.PYNATIVE_MODE:
        with pytest.raises(ValueError, match=r"`target` value 4 at position 1 is outside \[0, 4\)"):
            vocab_parallel_cross_entropy_rows(logits, target)
        return
    loss_rows = LossRows()(logits, target)
    np.testing.assert_array_equal(np.isnan(loss_rows.asnumpy()), [False, True, False])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"vocab_start": 2}, ValueError, r"\[2, 6\) must lie inside \[0, num_classes = 4\)"),
    ({"num_classes": 3}, ValueError, r"\[0, 4\) must lie inside \[0, num_classes = 3\)"),
    ({"vocab_start": 1.0}, TypeError, r"`vocab_start` must be an int, got 1.0"),
    ({"group": "some_group"}, RuntimeError, r"`group` 'some_group' was given but "),
    ({"weight": ms.Tensor(np.ones(5, np.float32))}, ValueError, r"`weight` must have shape \(4,\)"),
    ({"weight": ms.Tensor(np.array([1, np.inf, 1, 1], np.float32))}, ValueError,
     r"`weight` must be finite, got inf at class 1"),
    ({"label_smoothing": 1.0}, ValueError, r"`label_smoothing` must be in \[0, 1\)"),
    ({"ignore_index": 1.5}, TypeError, r"`ignore_index` must be an int"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    logits = ms.Tensor(np.zeros((3, 4), np.float32))
    target = ms.Tensor(np.array([1, 2, 3], np.int64))
    with pytest.raises(error, match=r"vocab_parallel_cross_entropy_rows: .*" + message):
        vocab_parallel_cross_entropy_rows(logits, target, **kwargs)


# ---- the Cell's parallel paths that a single process can check --------------------------------

def test_cell_with_model_parallel_but_no_communication_uses_the_whole_logits():
    case = worker.CASES["cell_mp"]
    logits, target, weight, mask = full_tensors(case)
    options = {"weight": weight, "ignore_index": worker.IGNORE_INDEX,
               "label_smoothing": case.label_smoothing,
               "lse_square_scale_for_zloss": case.zloss}
    split = CrossEntropyLoss({"data_parallel": 1, "model_parallel": 2}, **options)
    whole = CrossEntropyLoss(**options)
    assert not split.vocab_parallel
    np.testing.assert_array_equal(split(logits, target, mask).asnumpy(),
                                  whole(logits, target, mask).asnumpy())


def test_cell_group_without_vocabulary_split_is_refused():
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: `group` \('mp'\) applies only to "
                                         r"model_parallel > 1 .* here model_parallel = 1"):
        CrossEntropyLoss(group="mp")


@pytest.fixture
def semi_auto_parallel():
    """SEMI_AUTO_PARALLEL in the context while the test builds Cells (nothing is compiled: CPU
    refuses the mode at compile time)."""
    ms.set_auto_parallel_context(parallel_mode=ParallelMode.SEMI_AUTO_PARALLEL)
    try:
        yield
    finally:
        ms.reset_auto_parallel_context()


def test_semi_auto_parallel_sets_the_strategies_of_mindformers_loss(semi_auto_parallel):
    """Construction only (this path cannot run on CPU): the entry Adds carry the same strategies
    as MindFormers' own CrossEntropyLoss built under the same context."""
    from mindformers.core import CrossEntropyLoss as MindFormersCrossEntropyLoss
    from mindformers.modules import OpParallelConfig

    config = OpParallelConfig(data_parallel=2, model_parallel=4)
    ours = CrossEntropyLoss(config)
    theirs = MindFormersCrossEntropyLoss(config)
    assert ours.force_layout and not ours.vocab_parallel
    assert ours.add_logits.in_strategy == theirs.add.in_strategy == ((2, 4), ())
    assert ours.add_label.in_strategy == theirs.add_label.in_strategy == ((2,), ())
    assert ours.add_soft_label.in_strategy == ((2, 4), ())
    for prim in (ours.add_logits, ours.add_label, ours.add_soft_label):
        assert prim.attrs["keep_alive"] is True


# ---- msrun, 2 CPU workers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """The output directory of one msrun of every case of the worker per backend (run on first
    use under that backend: ``run_msrun`` passes the active backend to the workers)."""
    runs = {}

    def output_dir(backend):
        if backend not in runs:
            out_dir = tmp_path_factory.mktemp(f"vocab_parallel_{backend}")
            seconds = run_msrun(WORKER, out_dir)
            print(f"\nmsrun ({backend}, 2 CPU workers, {len(worker.CASES)} cases x "
                  f"{len(worker.MODES)} modes): {seconds:.1f} s", file=sys.stderr)
            runs[backend] = out_dir
        return runs[backend]
    return output_dir


def gathered(case, out_dir, name, mode, world_size=2):
    """The ranks' results put together as a single process would see them.

    mp: every rank must have the same loss and per-row values; the gradient slices are
    concatenated along the classes. dp: the gradients are concatenated along the rows; the
    "cell" loss is the mean of the ranks' losses and the gradient is divided by the number of
    ranks (what a data-parallel gradient mean does); "cell_per_token" losses (numerator over the
    global denominator) add up.
    """
    parts = [np.load(Path(out_dir) / f"{name}-{mode}-rank{rank}.npz")
             for rank in range(world_size)]
    result = {key: parts[0][key].astype(np.float64) for key in parts[0].files}
    grads = [part["grad"].astype(np.float64) for part in parts]
    if case.layout == "mp":
        for rank, part in enumerate(parts[1:], start=1):
            for key in ("loss", "loss_rows", "lse", "row_weight"):
                assert np.array_equal(part[key], parts[0][key]), (
                    f"{name} ({mode}): rank {rank} {key} {part[key]} != rank 0 {parts[0][key]}")
        result["grad"] = np.concatenate(grads, axis=1)
        return result
    losses = [float(part["loss"]) for part in parts]
    result["grad"] = np.concatenate(grads, axis=0)
    if case.api == "cell_per_token":
        result["loss"] = np.sum(losses)
    else:
        result["loss"] = np.mean(losses)
        result["grad"] /= world_size
    return result


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(worker.MODES))
@pytest.mark.parametrize("name", [name for name in worker.CASES if name != MINUS_INF_CASE])
def test_two_ranks_match_single_process(distributed_runs, backend, name, mode):
    case = worker.CASES[name]
    result = gathered(case, distributed_runs(backend), name, mode)
    check_against_references(result, case, f"{name} ({mode}, 2 ranks, {case.layout})")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(worker.MODES))
def test_two_ranks_minus_inf_target_slice_gives_inf_as_a_single_device(distributed_runs, backend,
                                                                     mode):
    """The target's logit and the owning rank's whole slice are -inf: the row's loss is +inf on
    every rank, as on a single device, not NaN; the other rows are unaffected."""
    case = worker.CASES[MINUS_INF_CASE]
    result = gathered(case, distributed_runs(backend), MINUS_INF_CASE, mode)
    single = single_process(case)
    assert np.isposinf(result["loss_rows"][2]) and np.isposinf(single["loss_rows"][2])
    others = np.arange(case.n_rows) != 2
    np.testing.assert_allclose(result["loss_rows"][others], single["loss_rows"][others],
                               rtol=1e-6)
    np.testing.assert_allclose(result["lse"], single["lse"], rtol=1e-6)
