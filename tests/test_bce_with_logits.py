"""ms_xent.ops.binary_cross_entropy_with_logits and ms_xent.nn.BCEWithLogitsLoss against PyTorch's
F.binary_cross_entropy_with_logits in float64 (on the inputs rounded to the tested dtype): forward,
gradients w.r.t. input and target, over shapes, weight / pos_weight broadcast patterns, reductions
(names and the vendor's integer codes), dtypes, PyNative and GRAPH_MODE (Cell, dynamic shapes),
extreme logits and bad input."""

import itertools

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from ms_xent.nn.bce_with_logits_loss import BCEWithLogitsLoss
from ms_xent.ops import binary_cross_entropy_with_logits
from tests.reference import (DTYPES, assert_close, assert_close_to_peak, rounded, to_ms, to_numpy,
                             torch_bce_with_logits)

# Every test runs on each backend (tests/conftest.py `backend`: cpu and composed).
pytestmark = pytest.mark.usefixtures("backend")

REDUCTION_NAMES = {0: "none", 1: "mean", 2: "sum", "none": "none", "mean": "mean", "sum": "sum"}
SHAPES = ((7,), (1,), (3, 17), (2, 3, 5), (4, 1, 33), (2, 2, 3, 19))
# Shape of weight / pos_weight for a target shape; None means the argument is left out.
PATTERNS = {
    "absent": lambda shape: None,
    "scalar": lambda shape: (1,),
    "last": lambda shape: shape[-1:],                                    # per class, PyTorch style
    "middle": lambda shape: shape[-2:-1] + (1,),                         # broadcast over last dim
    "leading_one": lambda shape: (1,) + shape[1:],                       # broadcast over first dim
    "full": lambda shape: shape,
}


def pairwise(**factors):
    """Rows covering every pair of values of any two factors (greedy, deterministic): far fewer
    cases than the full product, and every interaction of two settings is still tested."""
    names = list(factors)
    sizes = [len(factors[name]) for name in names]

    def pairs_of(row):
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(names)), 2)}

    candidates = {row: pairs_of(row)
                  for row in itertools.product(*(range(size) for size in sizes))}
    uncovered = set().union(*candidates.values())
    rows = []
    while uncovered:
        best = max(candidates, key=lambda row: len(candidates[row] & uncovered))
        uncovered -= candidates[best]
        rows.append(tuple(factors[name][index] for name, index in zip(names, best)))
    return rows


GRID = [pytest.param(*row, id="x".join(map(str, row[0])) + "-w_{}-pw_{}-{}-{}".format(*row[1:]))
        for row in pairwise(shape=SHAPES, weight=tuple(PATTERNS), pos_weight=tuple(PATTERNS),
                            reduction=("none", "mean", "sum", 0, 1, 2), dtype=tuple(DTYPES))]


def make_case(shape, weight_pattern, pos_weight_pattern, seed):
    """Logits, soft targets (a quarter of them exactly 0 or 1), weights, pos_weights, cotangent."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    t = rng.random(shape).astype(np.float32)
    hard = rng.random(shape) < 0.25
    t[hard] = np.round(t[hard])
    w_shape = PATTERNS[weight_pattern](shape)
    pw_shape = PATTERNS[pos_weight_pattern](shape)
    w = None if w_shape is None else (rng.random(w_shape) * 1.75 + 0.25).astype(np.float32)
    pw = None if pw_shape is None else (rng.random(pw_shape) * 3.5 + 0.5).astype(np.float32)
    cotangent = (rng.random(shape) + 0.5).astype(np.float32)
    return x, t, w, pw, cotangent


def optional(array, dtype):
    return None if array is None else to_ms(array, dtype)


def torch_expected(x, t, w, pw, reduction, dtype, cotangent=None):
    """The oracle on exactly the values the kernel reads (everything rounded to ``dtype``)."""
    return torch_bce_with_logits(
        rounded(x, dtype), rounded(t, dtype), None if w is None else rounded(w, dtype),
        None if pw is None else rounded(pw, dtype), REDUCTION_NAMES[reduction],
        None if cotangent is None else rounded(cotangent, dtype))


def check(loss, grad_x, grad_t, expected, dtype, shape, reduction):
    loss_ref, grad_x_ref, grad_t_ref = expected
    assert loss.dtype == dtype
    assert loss.shape == (shape if REDUCTION_NAMES[reduction] == "none" else ())
    assert_close(loss, loss_ref, dtype, "loss")
    assert grad_x.shape == shape and grad_t.shape == shape
    assert_close_to_peak(grad_x, grad_x_ref, dtype, "d loss / d input")
    assert_close_to_peak(grad_t, grad_t_ref, dtype, "d loss / d target")


@pytest.mark.parametrize("shape,weight_pattern,pos_weight_pattern,reduction,dtype_name", GRID)
def test_matches_torch_pynative(shape, weight_pattern, pos_weight_pattern, reduction, dtype_name):
    dtype = DTYPES[dtype_name]
    x, t, w, pw, cotangent = make_case(shape, weight_pattern, pos_weight_pattern, seed=len(shape))
    weight, pos_weight = optional(w, dtype), optional(pw, dtype)
    element_wise = REDUCTION_NAMES[reduction] == "none"

    def objective(logits, target):
        loss = binary_cross_entropy_with_logits(logits, target, weight, pos_weight, reduction)
        loss = loss.astype(ms.float32)
        return (loss * ms.Tensor(cotangent)).sum() if element_wise else loss

    xt, tt = to_ms(x, dtype), to_ms(t, dtype)
    loss = binary_cross_entropy_with_logits(xt, tt, weight, pos_weight, reduction)
    grad_x, grad_t = ms.grad(objective, grad_position=(0, 1))(xt, tt)
    expected = torch_expected(x, t, w, pw, reduction, dtype, cotangent if element_wise else None)
    check(loss, grad_x, grad_t, expected, dtype, shape, reduction)


class LossAndGrads(nn.Cell):
    """The Cell's loss and its gradients w.r.t. logits and labels, in one graph."""

    def __init__(self, loss_cell):
        super().__init__()
        self.loss_cell = loss_cell
        self.grad = ms.grad(self.summed, grad_position=(0, 1))

    def summed(self, logits, labels):
        return self.loss_cell(logits, labels).astype(ms.float32).sum()

    def construct(self, logits, labels):
        return (self.loss_cell(logits, labels),) + self.grad(logits, labels)


@pytest.mark.parametrize("shape,weight_pattern,pos_weight_pattern,reduction,dtype_name", [
    ((3, 17), "absent", "last", "mean", "float32"),
    ((2, 3, 5), "middle", "full", 0, "bfloat16"),
    ((2, 2, 3, 19), "full", "leading_one", "sum", "float16"),
])
def test_cell_in_graph_mode(shape, weight_pattern, pos_weight_pattern, reduction, dtype_name):
    ms.set_context(mode=ms.GRAPH_MODE)
    dtype = DTYPES[dtype_name]
    x, t, w, pw, _ = make_case(shape, weight_pattern, pos_weight_pattern, seed=3)
    cell = LossAndGrads(BCEWithLogitsLoss(optional(w, dtype), optional(pw, dtype), reduction))
    loss, grad_x, grad_t = cell(to_ms(x, dtype), to_ms(t, dtype))
    ones = np.ones(shape, np.float32) if REDUCTION_NAMES[reduction] == "none" else None
    check(loss, grad_x, grad_t, torch_expected(x, t, w, pw, reduction, dtype, ones), dtype, shape,
          reduction)


def test_dynamic_shapes_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    n_classes = 6
    rng = np.random.default_rng(5)
    pw = (rng.random(n_classes) + 0.5).astype(np.float32)
    cell = LossAndGrads(BCEWithLogitsLoss(pos_weight=ms.Tensor(pw), reduction="mean"))
    dynamic = ms.Tensor(shape=[None, None, n_classes], dtype=ms.float32)
    cell.set_inputs(dynamic, dynamic)
    for shape in ((2, 3, n_classes), (5, 1, n_classes)):
        x, t, _, _, _ = make_case(shape, "absent", "absent", seed=shape[0])
        loss, grad_x, grad_t = cell(ms.Tensor(x), ms.Tensor(t))
        check(loss, grad_x, grad_t, torch_expected(x, t, None, pw, "mean", ms.float32),
              ms.float32, shape, "mean")


EXTREME_LOGITS = np.array([-np.inf, -120, -20, -1e-3, 0, 1e-3, 20, 120, np.inf, np.nan], np.float32)
EXTREME_POS_WEIGHT = np.array([3, 3, 0.5, 2, 1, 0, 3, 3, 0.5, 2], np.float32)


@pytest.mark.parametrize("dtype_name", tuple(DTYPES))
@pytest.mark.parametrize("with_pos_weight", (False, True))
def test_extreme_logits_match_torch(dtype_name, with_pos_weight):
    """Finite everywhere PyTorch is (x = -120 with pos_weight included); inf / NaN where it is."""
    dtype = DTYPES[dtype_name]
    x = np.tile(EXTREME_LOGITS, (3, 1))
    t = np.repeat(np.array([[0.0], [0.25], [1.0]], np.float32), x.shape[1], axis=1)
    pw = EXTREME_POS_WEIGHT if with_pos_weight else None
    pos_weight = optional(pw, dtype)
    xt, tt = to_ms(x, dtype), to_ms(t, dtype)
    loss = binary_cross_entropy_with_logits(xt, tt, pos_weight=pos_weight, reduction="none")
    grad_x, grad_t = ms.grad(
        lambda a, b: binary_cross_entropy_with_logits(a, b, pos_weight=pos_weight,
                                                      reduction="sum"),
        grad_position=(0, 1))(xt, tt)
    loss_ref, grad_x_ref, grad_t_ref = torch_expected(x, t, None, pw, "none", dtype)
    assert np.isfinite(loss_ref[:, 1:8]).all()
    for actual, expected, what in ((loss, loss_ref, "loss"), (grad_x, grad_x_ref, "d/dx"),
                                   (grad_t, grad_t_ref, "d/dt")):
        actual = to_numpy(actual)
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=what)
        np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=what)
        np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=what)
        assert_close(actual, expected, dtype, what)
    mean = binary_cross_entropy_with_logits(xt, tt, pos_weight=pos_weight, reduction=1)
    assert np.isnan(to_numpy(mean))


def test_negative_logits_keep_relative_accuracy():
    """The loss of t = 0 at x << 0 is softplus(x), tiny: no cancellation of (1 - t) x + sp(-x)."""
    x = np.linspace(-30, -5, 64, dtype=np.float32)
    loss = binary_cross_entropy_with_logits(ms.Tensor(x), ms.Tensor(np.zeros_like(x)),
                                            pos_weight=ms.Tensor(np.float32([2.5])),
                                            reduction="none")
    np.testing.assert_allclose(to_numpy(loss), np.log1p(np.exp(x.astype(np.float64))), rtol=1e-5)


@pytest.mark.parametrize("dtype_name", ("float32", "bfloat16"))
def test_reduced_loss_accumulates_in_float32(dtype_name):
    """A sum over ~10^5 elements (several parallel chunks) keeps float32-or-better accuracy; only
    the final rounding to the input dtype remains (bfloat16: 2^-9 relative)."""
    dtype = DTYPES[dtype_name]
    x, t, w, _, _ = make_case((96, 1031), "last", "absent", seed=11)
    loss_ref, _, _ = torch_expected(x, t, w, None, "sum", dtype)
    loss = binary_cross_entropy_with_logits(to_ms(x, dtype), to_ms(t, dtype), to_ms(w, dtype),
                                            reduction="sum")
    limit = 2.0 ** -9 if dtype == ms.bfloat16 else 1e-6
    assert abs(to_numpy(loss) / loss_ref - 1) <= limit


def test_target_in_another_dtype_is_read_in_the_input_dtype():
    x, t, _, pw, _ = make_case((4, 9), "absent", "last", seed=2)
    xt, tt = to_ms(x, ms.bfloat16), ms.Tensor(t)
    pos_weight = ms.Tensor(pw)

    def objective(logits, target):
        return binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)

    loss = objective(xt, tt)
    grad_x, grad_t = ms.grad(objective, grad_position=(0, 1))(xt, tt)
    assert grad_t.dtype == ms.float32
    expected = torch_bce_with_logits(rounded(x, ms.bfloat16), rounded(t, ms.bfloat16),
                                     pos_weight=pw)
    check(loss, grad_x, grad_t, expected, ms.bfloat16, (4, 9), "mean")


def test_weight_and_pos_weight_get_zero_gradient():
    x, t, w, pw, _ = make_case((3, 4), "full", "last", seed=4)
    grads = ms.grad(binary_cross_entropy_with_logits, grad_position=(2, 3))(
        ms.Tensor(x), ms.Tensor(t), ms.Tensor(w), ms.Tensor(pw))
    for grad, like in zip(grads, (w, pw)):
        assert grad.shape == like.shape and not to_numpy(grad).any()


def test_zero_dim_and_empty_inputs():
    scalar = binary_cross_entropy_with_logits(ms.Tensor(np.float32(-2.0)),
                                              ms.Tensor(np.float32(0.3)), reduction="none")
    assert scalar.shape == ()
    assert_close(scalar, torch_bce_with_logits(-2.0, 0.3, reduction="none")[0], ms.float32)
    empty = ms.Tensor(np.zeros((0, 3), np.float32))
    assert binary_cross_entropy_with_logits(empty, empty, reduction="none").shape == (0, 3)
    assert to_numpy(binary_cross_entropy_with_logits(empty, empty, reduction="sum")) == 0
    assert np.isnan(to_numpy(binary_cross_entropy_with_logits(empty, empty, reduction="mean")))


F32 = np.float32
BAD_INPUTS = [
    ("target_shape", dict(t=np.zeros((3, 2), F32)), ValueError,
     r"`target` must have the shape of `input` \(2, 3\), got \(3, 2\)"),
    ("target_rank", dict(t=np.zeros((2, 3, 1), F32)), ValueError, "`target` must have the shape"),
    ("weight_shape", dict(weight=np.ones(2, F32)), ValueError,
     r"`weight` of shape \(2,\) cannot be broadcast to the shape of `target` \(2, 3\)"),
    ("weight_rank", dict(weight=np.ones((1, 2, 3), F32)), ValueError,
     r"`weight` of shape \(1, 2, 3\) cannot be broadcast"),
    ("pos_weight_shape", dict(pos_weight=np.ones(4, F32)), ValueError,
     r"`pos_weight` of shape \(4,\) cannot be broadcast"),
    ("reduction_name", dict(reduction="avg"), ValueError,
     "`reduction` must be one of .* got 'avg'"),
    ("reduction_code", dict(reduction=3), ValueError, "`reduction` must be one of .* got 3"),
    ("reduction_bool", dict(reduction=True), ValueError, "`reduction` must be one of .* got True"),
    ("input_int", dict(x=np.zeros((2, 3), np.int32)), TypeError,
     "`input` must be float16, bfloat16 or float32, got Int32"),
    ("input_float64", dict(x=np.zeros((2, 3), np.float64)), TypeError, "`input` must be float16"),
    ("target_int", dict(t=np.zeros((2, 3), np.int64)), TypeError,
     "`target` must be float16, bfloat16 or float32 .*, got Int64"),
    ("weight_int", dict(weight=np.ones(3, np.int32)), TypeError, "`weight` must be float16"),
    ("weight_negative", dict(weight=np.array([1, -1, 1], F32)), ValueError,
     "`weight` must be non-negative, got min -1"),
    ("pos_weight_negative", dict(pos_weight=np.array([1, 2, -0.5], F32)), ValueError,
     "`pos_weight` must be non-negative, got min -0.5"),
    ("weight_not_tensor", dict(weight=[1.0, 1.0, 1.0]), TypeError,
     "`weight` must be a Tensor or None, got list"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(case):
    _, changes, error, message = case
    changes = dict(changes)
    args = {"input": ms.Tensor(changes.pop("x", np.zeros((2, 3), F32))),
            "target": ms.Tensor(changes.pop("t", np.zeros((2, 3), F32)))}
    args.update({name: ms.Tensor(value) if isinstance(value, np.ndarray) else value
                 for name, value in changes.items()})
    with pytest.raises(error, match="binary_cross_entropy_with_logits: " + message):
        binary_cross_entropy_with_logits(**args)


def test_bad_input_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    x = ms.Tensor(np.zeros((2, 3), F32))
    with pytest.raises(ValueError, match="`target` must have the shape of `input`"):
        BCEWithLogitsLoss()(x, ms.Tensor(np.zeros((3, 2), F32)))
    with pytest.raises(ValueError, match=r"`pos_weight` of shape \(2,\) cannot be broadcast"):
        BCEWithLogitsLoss(pos_weight=np.ones(2))(x, x)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(reduction="avg"), ValueError, "BCEWithLogitsLoss: `reduction` must be one of"),
    (dict(weight=[1.0, -2.0]), ValueError, "BCEWithLogitsLoss: `weight` must be non-negative"),
    (dict(pos_weight="heavy"), TypeError, "BCEWithLogitsLoss: `pos_weight` must be a Tensor, an "
                                          "array-like of numbers or None, got 'heavy'"),
])
def test_cell_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        BCEWithLogitsLoss(**kwargs)
