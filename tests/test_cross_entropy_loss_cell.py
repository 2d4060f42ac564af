"""The CrossEntropyLoss Cell (ms_xent.nn.cross_entropy_loss): parity with
mindformers.core.CrossEntropyLoss (value, shape, dtype, gradient), every option against a float64
PyTorch oracle, per-token outputs, the NaN check, flattening, half precision, parallel_config
parsing and bad input, in PYNATIVE and GRAPH mode."""

import re

import numpy as np
import pytest
import mindspore as ms
from mindspore.common.api import _pynative_executor

from mindformers import MindFormerConfig
from mindformers.core import CrossEntropyLoss as MindFormersCrossEntropyLoss
from mindformers.modules import OpParallelConfig, TransformerOpParallelConfig

from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from tests.reference import (assert_close, assert_close_to_peak, rounded, to_ms, to_numpy,
                             torch_masked_cross_entropy)

# Every test runs on each backend (tests/conftest.py `backend`: cpu and composed).
pytestmark = pytest.mark.usefixtures("backend")

# ms_xent vs MindFormers on the same float32 inputs: both accumulate in float32.
PARITY_LOSS_RTOL = 1e-6
PARITY_GRAD_ATOL_TO_PEAK = 1e-5


def make_batch(n_rows, n_classes, seed, mask_fraction=0.3, ignore_masked=False, soft=False):
    """logits [N, C] float32, labels, float32 mask with about ``mask_fraction`` zeros.

    ``ignore_masked`` puts label -100 on masked-out rows, as MindFormers' models produce them.
    """
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n_classes)) * 3).astype(np.float32)
    mask = (rng.random(n_rows) >= mask_fraction).astype(np.float32)
    if soft:
        label = rng.random((n_rows, n_classes)).astype(np.float32)
        label /= label.sum(axis=1, keepdims=True)
    else:
        label = rng.integers(0, n_classes, n_rows).astype(np.int32)
        if ignore_masked:
            label[mask == 0] = -100
    return x, label, mask


def loss_and_grad(cell, *inputs):
    """(loss, d loss / d logits) with an upstream gradient of ones."""
    return ms.value_and_grad(cell)(*inputs)


PARITY_CASES = {  # mode, N, C, fraction of masked-out rows, seed
    "pynative-masked": ("pynative", 37, 50, 0.3, 0),
    "graph-masked": ("graph", 37, 50, 0.3, 0),
    "pynative-unmasked-256x1000": ("pynative", 256, 1000, 0.0, 1),
    "graph-all-masked": ("graph", 16, 9, 1.0, 2),
}


@pytest.mark.parametrize("mode,n_rows,n_classes,mask_fraction,seed", PARITY_CASES.values(),
                         ids=PARITY_CASES.keys(), indirect=["mode"])
def test_matches_mindformers_float32(mode, n_rows, n_classes, mask_fraction, seed):
    x, label, mask = make_batch(n_rows, n_classes, seed, mask_fraction, ignore_masked=True)
    inputs = (ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    ours, ours_grad = loss_and_grad(CrossEntropyLoss(), *inputs)
    theirs, theirs_grad = loss_and_grad(MindFormersCrossEntropyLoss(), *inputs)

    assert ours.shape == theirs.shape == (1,)
    assert ours.dtype == theirs.dtype == ms.float32
    assert ours_grad.dtype == theirs_grad.dtype == ms.float32
    loss_error = abs(float(ours[0]) - float(theirs[0]))
    grad_error = float(np.abs(ours_grad.asnumpy() - theirs_grad.asnumpy()).max())
    print(f"\n[{mode} {n_rows}x{n_classes} mask {mask_fraction}] vs MindFormers: loss "
          f"{float(theirs[0]):.7f}, max abs error loss {loss_error:.2e}, grad {grad_error:.2e}")
    np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), rtol=PARITY_LOSS_RTOL, atol=0)
    peak = max(float(np.abs(theirs_grad.asnumpy()).max()), 1e-30)
    assert grad_error <= PARITY_GRAD_ATOL_TO_PEAK * peak
    if mask_fraction == 1.0:
        assert float(ours[0]) == 0.0 and not ours_grad.asnumpy().any()


@pytest.mark.parametrize("mode,options", [
    ("pynative", {"calculate_per_token_loss": True}), ("graph", {"calculate_per_token_loss": True}),
    ("pynative", {"seq_split_num": 2})], ids=["pynative-per-token", "graph-per-token",
                                              "pynative-seq-split"], indirect=["mode"])
def test_per_token_output_matches_mindformers(mode, options):
    x, label, mask = make_batch(40, 30, 3, ignore_masked=True)
    inputs = (ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    ours = CrossEntropyLoss(**options)(*inputs)
    theirs = MindFormersCrossEntropyLoss(**options)(*inputs)
    assert len(ours) == len(theirs) == 2
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape and mine.dtype == reference.dtype == ms.float32
        np.testing.assert_allclose(mine.asnumpy(), reference.asnumpy(), rtol=PARITY_LOSS_RTOL)
    assert ours[0].shape == () and ours[1].shape == (1,)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_logits_match_mindformers(dtype_name):
    """MindFormers casts the logits to float32: the loss is float32, the gradient half."""
    dtype = getattr(ms, dtype_name)
    x, label, mask = make_batch(48, 64, 4, ignore_masked=True)
    inputs = (to_ms(x, dtype), ms.Tensor(label), ms.Tensor(mask))
    ours, ours_grad = loss_and_grad(CrossEntropyLoss(), *inputs)
    theirs, theirs_grad = loss_and_grad(MindFormersCrossEntropyLoss(), *inputs)
    assert ours.dtype == theirs.dtype == ms.float32 and ours.shape == (1,)
    assert ours_grad.dtype == theirs_grad.dtype == dtype
    np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), rtol=PARITY_LOSS_RTOL)
    # One rounding of the float32 gradient to the half type on each side.
    assert_close_to_peak(ours_grad, to_numpy(theirs_grad), dtype, "gradient")


def test_non_finite_logits_propagate_like_mindformers():
    x, label, mask = make_batch(12, 10, 5)
    mask[3] = 0.0
    x[3, 2] = np.nan  # a masked-out row: 0 * NaN is still NaN in both
    inputs = (ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    assert np.isnan(CrossEntropyLoss()(*inputs).asnumpy()).all()
    assert np.isnan(MindFormersCrossEntropyLoss()(*inputs).asnumpy()).all()


OPTION_CASES = {
    "weight": {"weight": True},
    "ignore-index-3": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.1},
    "zloss": {"lse_square_scale_for_zloss": 0.01},
    "all-mean": {"weight": True, "ignore_index": 3, "label_smoothing": 0.2,
                 "lse_square_scale_for_zloss": 0.05},
    "all-sum": {"weight": True, "ignore_index": 3, "label_smoothing": 0.2,
                "lse_square_scale_for_zloss": 0.05, "reduction": "sum"},
    "all-none": {"weight": True, "ignore_index": 3, "label_smoothing": 0.2,
                 "lse_square_scale_for_zloss": 0.05, "reduction": "none"},
    "soft": {"soft": True, "weight": True, "label_smoothing": 0.1,
             "lse_square_scale_for_zloss": 0.01},
}


# GRAPH mode runs the cases that together use every option.
OPTION_RUNS = [("pynative", case) for case in OPTION_CASES] + [
    ("graph", case) for case in ("all-mean", "all-none", "soft")]


@pytest.mark.parametrize("mode,case", OPTION_RUNS, ids=[f"{m}-{c}" for m, c in OPTION_RUNS],
                         indirect=["mode"])
def test_options_vs_torch(mode, case):
    options = dict(OPTION_CASES[case])
    soft = options.pop("soft", False)
    n_classes = 11
    x, label, mask = make_batch(29, n_classes, 6, soft=soft)
    if "ignore_index" in options:
        label[::4] = options["ignore_index"]
        mask[::8] = 1.0  # ignored rows with mask 1 still count for nothing
    weight = None
    if options.pop("weight", False):
        weight = np.random.default_rng(7).uniform(0.2, 2.0, n_classes).astype(np.float32)
    cell = CrossEntropyLoss(weight=weight, **options)
    loss, grad = loss_and_grad(cell, ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))

    reduction = options.get("reduction", "mean")
    expected, expected_grad = torch_masked_cross_entropy(
        x, label, mask, weight, options.get("ignore_index", -100),
        options.get("label_smoothing", 0.0), options.get("lse_square_scale_for_zloss", 0.0),
        reduction)
    assert loss.dtype == ms.float32
    assert loss.shape == ((29,) if reduction == "none" else (1,))
    assert_close(loss, np.reshape(expected, loss.shape), ms.float32, "loss")
    assert_close_to_peak(grad, expected_grad, ms.float32, "gradient")


def test_weighted_mean_formula_by_hand():
    """The documented weighted masked mean with z-loss, written out for a 3 x 2 example."""
    x = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], np.float32)
    label = np.array([1, 0, 0], np.int32)
    mask = np.array([1.0, 1.0, 0.0], np.float32)
    weight = np.array([3.0, 0.5], np.float32)
    scale = 0.1
    lse = np.log(np.exp(x.astype(np.float64)).sum(axis=1))
    rows = weight[label] * (lse - x[np.arange(3), label])
    # The z-loss is unweighted, with its own denominator (the masked row count).
    expected = ((mask * rows).sum() / ((mask * weight[label]).sum() + 1e-8)
                + (mask * scale * lse ** 2).sum() / (mask.sum() + 1e-8))
    loss = CrossEntropyLoss(weight=weight, lse_square_scale_for_zloss=scale)(
        ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    assert_close(loss, [expected], ms.float32)


# Class weights, or a z-loss (unweighted, so it shares the denominator only without weights).
@pytest.mark.parametrize("weighted,zloss_scale", [(True, 0.0), (False, 0.02)],
                         ids=["weighted", "zloss"])
def test_per_token_numerator_and_denominator_vs_torch(weighted, zloss_scale):
    x, label, mask = make_batch(33, 17, 8)
    weight = np.random.default_rng(9).uniform(0.5, 1.5, 17).astype(np.float32) if weighted \
        else None
    cell = CrossEntropyLoss(calculate_per_token_loss=True, weight=weight,
                            lse_square_scale_for_zloss=zloss_scale)
    (numerator, denominator), grad = loss_and_grad(cell, ms.Tensor(x), ms.Tensor(label),
                                                   ms.Tensor(mask))
    expected_sum, expected_grad = torch_masked_cross_entropy(
        x, label, mask, weight, zloss_scale=zloss_scale, reduction="sum")
    assert numerator.shape == () and denominator.shape == (1,)
    assert_close(numerator, expected_sum, ms.float32, "numerator")
    rho = weight[label] if weighted else np.ones(33, np.float32)
    assert_close(denominator, [(mask * rho).sum() + 1e-8], ms.float32, "denominator")
    # The denominator does not depend on the logits: the gradient is d numerator / d logits.
    assert_close_to_peak(grad, expected_grad, ms.float32, "gradient")
    mean = CrossEntropyLoss(weight=weight, lse_square_scale_for_zloss=zloss_scale)(
        ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    assert_close(mean, (numerator / denominator).asnumpy(), ms.float32, "mean")


@pytest.mark.parametrize("mode,soft", [("pynative", False), ("graph", False), ("pynative", True)],
                         ids=["pynative-class-indices", "graph-class-indices",
                              "pynative-probabilities"], indirect=["mode"])
def test_leading_dims_are_flattened(mode, soft):
    x, label, mask = make_batch(12, 7, 10, soft=soft)
    cell = CrossEntropyLoss(label_smoothing=0.1)
    flat, flat_grad = loss_and_grad(cell, ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    label_3d = label.reshape((2, 6) + label.shape[1:])
    batched, batched_grad = loss_and_grad(cell, ms.Tensor(x.reshape(2, 6, 7)),
                                          ms.Tensor(label_3d), ms.Tensor(mask.reshape(2, 6)))
    assert batched_grad.shape == (2, 6, 7)
    np.testing.assert_array_equal(batched.asnumpy(), flat.asnumpy())
    np.testing.assert_array_equal(batched_grad.asnumpy().reshape(12, 7), flat_grad.asnumpy())
    rows = CrossEntropyLoss(reduction="none")(ms.Tensor(x.reshape(2, 6, 7)), ms.Tensor(label_3d))
    expected_rows, _ = torch_masked_cross_entropy(x, label, reduction="none")
    assert rows.shape == (12,)
    assert_close(rows, expected_rows, ms.float32, "per-row loss")


def test_dynamic_shapes_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    cell = CrossEntropyLoss(check_for_nan_in_loss_and_grad=True, lse_square_scale_for_zloss=0.01)
    cell.set_inputs(ms.Tensor(shape=[None, None, 7], dtype=ms.float32),
                    ms.Tensor(shape=[None, None], dtype=ms.int32),
                    ms.Tensor(shape=[None, None], dtype=ms.float32))
    for seed, (batch, seq) in enumerate([(2, 3), (4, 5)]):
        x, label, mask = make_batch(batch * seq, 7, 20 + seed)
        loss = cell(ms.Tensor(x.reshape(batch, seq, 7)), ms.Tensor(label.reshape(batch, seq)),
                    ms.Tensor(mask.reshape(batch, seq)))
        expected, _ = torch_masked_cross_entropy(x, label, mask, zloss_scale=0.01)
        assert_close(loss, [expected], ms.float32, f"batch {batch} x {seq}")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("soft", [False, True], ids=["class-indices", "probabilities"])
def test_half_precision_vs_torch(dtype_name, soft):
    dtype = getattr(ms, dtype_name)
    x, label, mask = make_batch(40, 96, 11, soft=soft)
    x16 = rounded(x, dtype)
    label_in = to_ms(label, dtype) if soft else ms.Tensor(label)
    label_seen = rounded(label, dtype) if soft else label
    cell = CrossEntropyLoss(label_smoothing=0.05, lse_square_scale_for_zloss=0.01)
    loss, grad = loss_and_grad(cell, to_ms(x, dtype), label_in, ms.Tensor(mask))
    expected, expected_grad = torch_masked_cross_entropy(x16, label_seen, mask,
                                                         label_smoothing=0.05, zloss_scale=0.01)
    assert loss.dtype == ms.float32 and grad.dtype == dtype
    assert_close(loss, [expected], dtype, "loss")
    assert_close_to_peak(grad, expected_grad, dtype, "gradient")


def test_without_input_mask_every_row_counts():
    x, label, _ = make_batch(20, 6, 12)
    loss = CrossEntropyLoss(ignore_index=0)(ms.Tensor(x), ms.Tensor(label))
    expected, _ = torch_masked_cross_entropy(x, label, ignore_index=0)
    assert_close(loss, [expected], ms.float32)


@pytest.mark.parametrize("mode,shown", [("pynative", "nan"), ("graph", "nan"), ("pynative", "inf")],
                         ids=["pynative-nan", "graph-nan", "pynative-inf"], indirect=["mode"])
def test_nan_check_raises_naming_the_loss_and_the_rows(mode, shown):
    x, label, mask = make_batch(16, 8, 13, mask_fraction=0.0)
    if shown == "nan":
        x[5, 1] = np.nan
    else:
        x[5, label[5]] = -np.inf  # the true class has probability 0: loss +inf
    inputs = (ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    unchecked = CrossEntropyLoss()(*inputs)
    assert not np.isfinite(unchecked.asnumpy()).any()
    message = r"the loss is not finite \(\[" + shown + r"\]\) on .*1 of 16 rows"
    with pytest.raises(RuntimeError, match=message):
        CrossEntropyLoss(check_for_nan_in_loss_and_grad=True)(*inputs).asnumpy()


def test_nan_check_names_the_per_token_numerator_under_autodiff():
    x, label, mask = make_batch(16, 8, 13)
    x[2, 0] = np.nan
    cell = CrossEntropyLoss(check_for_nan_in_loss_and_grad=True, calculate_per_token_loss=True)
    with pytest.raises(RuntimeError, match=r"the numerator of the per-token loss is not finite"):
        loss_and_grad(cell, ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))[1].asnumpy()
    # The raise interrupted PyNative's gradient recording; a training job stops here, but this
    # process goes on to compile other graphs, which the half-recorded state would break.
    _pynative_executor.clear_res()


def test_nan_check_passes_finite_loss_through(mode):
    x, label, mask = make_batch(16, 8, 14)
    inputs = (ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    checked, checked_grad = loss_and_grad(CrossEntropyLoss(check_for_nan_in_loss_and_grad=True),
                                          *inputs)
    plain, plain_grad = loss_and_grad(CrossEntropyLoss(), *inputs)
    np.testing.assert_array_equal(checked.asnumpy(), plain.asnumpy())
    np.testing.assert_array_equal(checked_grad.asnumpy(), plain_grad.asnumpy())


def test_nan_check_names_the_process():
    x, label, _ = make_batch(4, 3, 15)
    x[0, 0] = np.nan
    with pytest.raises(RuntimeError, match=r"on this process \(communication not initialised"):
        CrossEntropyLoss(check_for_nan_in_loss_and_grad=True)(ms.Tensor(x), ms.Tensor(label))


def test_zloss_ignores_non_finite_lse_of_ignored_rows():
    """An ignored row counts for nothing, whatever its logits, with and without z-loss."""
    x, label, _ = make_batch(6, 5, 16)
    x[2, :] = np.nan
    label[2] = -100
    cell = CrossEntropyLoss(lse_square_scale_for_zloss=0.1)
    loss, grad = loss_and_grad(cell, ms.Tensor(x), ms.Tensor(label))
    keep = np.arange(6) != 2
    expected, expected_grad = torch_masked_cross_entropy(x[keep], label[keep], zloss_scale=0.1)
    assert_close(loss, [expected], ms.float32)
    assert_close_to_peak(grad.asnumpy()[keep], expected_grad, ms.float32)
    assert not grad.asnumpy()[2].any()


@pytest.mark.parametrize("config,expected", [
    (None, (1, 1)),
    ({"data_parallel": 4, "model_parallel": 1}, (4, 1)),
    ({"data_parallel": 2}, (2, 1)),
    (MindFormerConfig(data_parallel=8, model_parallel=1), (8, 1)),
    (OpParallelConfig(data_parallel=2, model_parallel=1), (2, 1)),
    (TransformerOpParallelConfig(data_parallel=2, model_parallel=1), (2, 1)),
], ids=["none", "dict", "dict-dp-only", "MindFormerConfig", "OpParallelConfig",
        "TransformerOpParallelConfig"])
def test_parallel_config_is_read_by_duck_typing(config, expected):
    cell = CrossEntropyLoss(parallel_config=config)
    assert (cell.data_parallel, cell.model_parallel) == expected


def test_misspelled_keyword_raises_with_the_closest_name():
    """A misspelled option must not train without it (MindFormers passes only declared names)."""
    with pytest.raises(TypeError, match="unexpected keyword argument `label_smothing`; did you "
                                        "mean `label_smoothing`?"):
        CrossEntropyLoss(label_smothing=0.1)


def test_mindformers_keywords_are_accepted():
    """The keywords MindFormers 1.9.0's models pass to their loss (llama.py, glm2.py) and the
    trainer's check_for_nan_in_loss_and_grad."""
    cell = CrossEntropyLoss(parallel_config=OpParallelConfig(data_parallel=1, model_parallel=1),
                            calculate_per_token_loss=False, seq_split_num=1,
                            check_for_nan_in_loss_and_grad=False)
    assert cell.seq_split_num == 1


BAD_CONSTRUCTION = [
    ("reduction", {"reduction": "avg"}, ValueError, "`reduction` must be one of"),
    ("smoothing", {"label_smoothing": 1.0}, ValueError, "`label_smoothing` must be in"),
    ("zloss", {"lse_square_scale_for_zloss": -0.1}, ValueError, "`lse_square_scale_for_zloss`"),
    ("zloss-inf", {"lse_square_scale_for_zloss": float("inf")}, ValueError,
     "`lse_square_scale_for_zloss` must be finite and >= 0"),
    ("weight-zloss-per-token", {"weight": [1.0, 2.0], "lse_square_scale_for_zloss": 0.1,
                                "calculate_per_token_loss": True}, ValueError,
     "`weight` with `lse_square_scale_for_zloss` > 0 and the (numerator, denominator) output"),
    ("accuracy-flag", {"return_token_accuracy": 1}, TypeError,
     "`return_token_accuracy` must be a bool"),
    ("ignore-index", {"ignore_index": 1.5}, TypeError, "`ignore_index` must be an int"),
    ("inf-weight", {"weight": [1.0, np.inf]}, ValueError,
     "`weight` must be finite, got inf at class 1"),
    ("weight-2d", {"weight": [[1.0]]}, ValueError, "`weight` must be 1-D"),
    ("per-token-sum", {"calculate_per_token_loss": True, "reduction": "sum"}, ValueError,
     "needs reduction 'mean', got 'sum'"),
    ("seq-split", {"seq_split_num": 0}, ValueError, "`seq_split_num` must be a positive int"),
    ("flag", {"check_for_nan_in_loss_and_grad": "yes"}, TypeError,
     "`check_for_nan_in_loss_and_grad` must be a bool"),
    ("parallel-type", {"parallel_config": "dp=2"}, TypeError, "`parallel_config` must be"),
    ("parallel-value", {"parallel_config": {"data_parallel": 0}}, ValueError,
     "`parallel_config.data_parallel` must be a positive int, got 0"),
]


@pytest.mark.parametrize("case", BAD_CONSTRUCTION, ids=[case[0] for case in BAD_CONSTRUCTION])
def test_bad_construction_raises_naming_the_argument(case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=re.escape(message)):
        CrossEntropyLoss(**kwargs)


def test_flags_after_parallel_config_are_keyword_only():
    """MindFormers' positional order changed between releases; positional use is refused."""
    with pytest.raises(TypeError):
        CrossEntropyLoss(None, True)  # pylint: disable=too-many-function-args


BAD_CALLS = [
    ("label-rows", lambda x, y, m: (x, y[:5], m), ValueError,
     "`label` must hold [N] class indices for the N = 6 rows"),
    ("mask-rows", lambda x, y, m: (x, y, m[:4]), ValueError,
     "`input_mask` must have one entry per row of `logits` (N = 6), got shape (4,)"),
    ("soft-classes", lambda x, y, m: (x, np.ones((6, 3), np.float32), m), ValueError,
     "probability `label` must end with the class axis of `logits` (4)"),
    ("logits-1d", lambda x, y, m: (x[0], y[:1], None), ValueError,
     "`logits` must be [..., C] with at least 2 dims"),
    ("logits-int", lambda x, y, m: (x.astype(np.int32), y, m), TypeError,
     "`logits` must be float16, bfloat16 or float32"),
    ("label-range", lambda x, y, m: (x, np.full(6, 4, np.int32), m), ValueError,
     "CrossEntropyLoss: `target` value 4 at position 0 is outside [0, 4)"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_bad_inputs_raise_naming_the_argument(case):
    _, make_inputs, error, message = case
    x, label, mask = make_batch(6, 4, 17)
    inputs = [None if value is None else ms.Tensor(value) for value in make_inputs(x, label, mask)]
    with pytest.raises(error, match=re.escape(message)):
        CrossEntropyLoss()(*inputs)


def test_bad_shape_is_reported_when_the_graph_compiles():
    ms.set_context(mode=ms.GRAPH_MODE)
    x, label, mask = make_batch(6, 4, 18)
    with pytest.raises(ValueError, match=re.escape("`input_mask` must have one entry per row")):
        CrossEntropyLoss()(ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask[:3]))


# ---- optional outputs: z-loss, token accuracy, predicted tokens --------------------------------

EXTRA_CASES = {  # Cell options, soft labels
    "mean-all-extras": ({"weight": True, "ignore_index": 3, "lse_square_scale_for_zloss": 1.5,
                         "label_smoothing": 0.1, "logit_softcap": 4.0}, False),
    "sum-zloss-accuracy": ({"reduction": "sum", "lse_square_scale_for_zloss": 0.05,
                            "logit_scale": -1.0}, False),
    "none-all-extras": ({"reduction": "none", "ignore_index": 3,
                         "lse_square_scale_for_zloss": 0.05}, False),
    "per-token-all-extras": ({"calculate_per_token_loss": True, "ignore_index": 3,
                              "lse_square_scale_for_zloss": 0.05}, False),
    "soft-zloss-predicted": ({"weight": True, "lse_square_scale_for_zloss": 0.05}, True),
}
EXTRA_RUNS = [("pynative", case) for case in EXTRA_CASES] + [
    ("graph", case) for case in ("mean-all-extras", "per-token-all-extras",
                                 "soft-zloss-predicted")]


def map_logits(x, options):
    scale, cap = options.get("logit_scale", 1.0), options.get("logit_softcap", 0.0)
    z = scale * x.astype(np.float64)
    return cap * np.tanh(z / cap) if cap > 0 else z


@pytest.mark.parametrize("mode,case", EXTRA_RUNS, ids=[f"{m}-{c}" for m, c in EXTRA_RUNS],
                         indirect=["mode"])
def test_z_loss_token_accuracy_and_predicted_tokens_vs_torch(mode, case):
    options, soft = EXTRA_CASES[case]
    options = dict(options)
    n_classes = 11
    x, label, mask = make_batch(29, n_classes, 21, soft=soft)
    ignore_index = options.get("ignore_index", -100)
    if not soft:
        z = map_logits(x, options)
        label[:10] = z[:10].argmax(axis=1)  # some hits
        label[::4] = ignore_index
        mask[::8] = 1.0
    weight = None
    if options.pop("weight", False):
        weight = np.random.default_rng(7).uniform(0.2, 2.0, n_classes).astype(np.float32)
    cell = CrossEntropyLoss(weight=weight, return_z_loss=True, return_token_accuracy=not soft,
                            return_predicted_tokens=True, **options)
    per_token = options.get("calculate_per_token_loss", False)
    outputs = cell(ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    assert len(outputs) == 1 + per_token + 1 + (not soft) + 1

    reduction = "sum" if per_token else options.get("reduction", "mean")
    z_x = map_logits(x, options)
    expected, _, expected_z = torch_masked_cross_entropy(
        z_x, label, mask, weight, ignore_index, options.get("label_smoothing", 0.0),
        options.get("lse_square_scale_for_zloss", 0.0), reduction, return_z_loss=True)
    loss, z_loss = outputs[0], outputs[2 if per_token else 1]
    assert_close(loss, np.reshape(expected, loss.shape), ms.float32, "loss")
    assert z_loss.shape == loss.shape
    assert_close(z_loss, np.reshape(expected_z, z_loss.shape), ms.float32, "z-loss")
    import torch
    want_tokens = torch.argmax(torch.tensor(z_x), dim=1).numpy()
    tokens = outputs[-1].asnumpy()
    assert tokens.dtype == (np.int64 if soft else np.int32)
    np.testing.assert_array_equal(tokens, want_tokens)
    if not soft:
        counted = (label != ignore_index) & (mask != 0)
        want_accuracy = ((want_tokens == label) & counted).sum() / counted.sum()
        accuracy = outputs[-2]
        assert accuracy.shape == () and accuracy.dtype == ms.float32
        assert 0 < want_accuracy < 1
        np.testing.assert_allclose(accuracy.asnumpy(), want_accuracy, rtol=1e-6)


@pytest.mark.parametrize("mode", ["pynative", "graph"], indirect=True)
def test_z_loss_scale_of_one_and_more_is_accepted(mode):
    x, label, mask = make_batch(13, 5, 22)
    cell = CrossEntropyLoss(lse_square_scale_for_zloss=2.0)
    loss, grad = loss_and_grad(cell, ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    expected, expected_grad = torch_masked_cross_entropy(x, label, mask, zloss_scale=2.0)
    assert_close(loss, np.reshape(expected, (1,)), ms.float32, "loss")
    assert_close_to_peak(grad, expected_grad, ms.float32, "gradient")


@pytest.mark.parametrize("mode", ["pynative", "graph"], indirect=True)
def test_recorded_token_accuracy_without_changing_the_output(mode):
    """record_token_accuracy keeps the loss-only output and the gradient, and stores each call's
    accuracy (also under autodiff, where the forward runs inside the gradient graph)."""
    x, label, mask = make_batch(31, 6, 23)
    label[:12] = x[:12].argmax(axis=1)
    label[::5] = -100
    cell = CrossEntropyLoss(record_token_accuracy=True)
    plain = CrossEntropyLoss()
    inputs = (ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    loss, grad = loss_and_grad(cell, *inputs)
    want_loss, want_grad = loss_and_grad(plain, *inputs)
    np.testing.assert_array_equal(loss.asnumpy(), want_loss.asnumpy())
    np.testing.assert_array_equal(grad.asnumpy(), want_grad.asnumpy())
    counted = (label != -100) & (mask != 0)
    want = ((x.argmax(axis=1) == label) & counted).sum() / counted.sum()
    np.testing.assert_allclose(cell.last_token_accuracy.asnumpy(), want, rtol=1e-6)
    # A second call with other labels overwrites it.
    label[:] = -100
    cell(ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    assert cell.last_token_accuracy.asnumpy() == 0.0
    assert not cell.last_token_accuracy.requires_grad


def test_token_accuracy_needs_class_index_labels():
    x, label, mask = make_batch(6, 4, 24, soft=True)
    with pytest.raises(ValueError, match="`return_token_accuracy` / `record_token_accuracy` need "
                                         "class-index labels"):
        CrossEntropyLoss(return_token_accuracy=True)(ms.Tensor(x), ms.Tensor(label))


class DenseWithLoss(ms.nn.Cell):
    """A linear classifier trained on the recorded-accuracy loss (a loss Cell inside a network,
    as in MindFormers' models)."""

    def __init__(self, n_features, n_classes):
        super().__init__()
        self.dense = ms.nn.Dense(n_features, n_classes)
        self.loss = CrossEntropyLoss(record_token_accuracy=True)

    def construct(self, features, label):
        return self.loss(self.dense(features), label)


@pytest.mark.parametrize("mode", ["pynative", "graph"], indirect=True)
def test_token_accuracy_monitor_reads_each_step_of_model_train(mode):
    from mindspore.train import Model
    import mindspore.dataset as ds
    from ms_xent.nn import TokenAccuracyMonitor

    rng = np.random.default_rng(25)
    features = rng.standard_normal((4 * 16, 8)).astype(np.float32)
    label = rng.integers(0, 5, 4 * 16).astype(np.int32)
    label[::3] = -100
    network = DenseWithLoss(8, 5)
    optimizer = ms.nn.SGD(network.trainable_params(), learning_rate=0.5)
    dataset = ds.NumpySlicesDataset({"features": features, "label": label},
                                    shuffle=False).batch(16)
    seen = []

    class Expected(ms.train.Callback):
        """The accuracy of the step's logits, from the weights before the update."""

        def on_train_step_begin(self, run_context):
            step = len(seen)
            rows = slice(16 * step, 16 * (step + 1))
            logits = features[rows] @ network.dense.weight.asnumpy().T + \
                network.dense.bias.asnumpy()
            counted = label[rows] != -100
            seen.append(((logits.argmax(axis=1) == label[rows]) & counted).sum() / counted.sum())

    monitor = TokenAccuracyMonitor()
    Model(network, optimizer=optimizer).train(1, dataset, callbacks=[Expected(), monitor],
                                              dataset_sink_mode=False)
    assert len(monitor.accuracies) == 4
    np.testing.assert_allclose(monitor.accuracies, seen, rtol=1e-6)
    assert len(set(seen)) > 1  # the steps differ: each read is that step's value


def test_token_accuracy_monitor_without_a_recording_loss_raises():
    from mindspore.train import Model
    import mindspore.dataset as ds
    from ms_xent.nn import TokenAccuracyMonitor

    network = ms.nn.WithLossCell(ms.nn.Dense(3, 2), CrossEntropyLoss())
    dataset = ds.NumpySlicesDataset({"x": np.zeros((4, 3), np.float32),
                                     "y": np.zeros(4, np.int32)}, shuffle=False).batch(2)
    optimizer = ms.nn.SGD(network.trainable_params())
    with pytest.raises(RuntimeError, match="record_token_accuracy=True"):
        Model(network, optimizer=optimizer).train(1, dataset, callbacks=[TokenAccuracyMonitor()],
                                                  dataset_sink_mode=False)
