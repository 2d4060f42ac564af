"""Regression tests: one per failure that users of other fused / framework losses have hit.
Each test is named after the failure and cites where it was reported; each
compares with an independent float64 oracle (numpy from tests/reference.py, or PyTorch).
"""

import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

import ms_xent
from ms_xent.nn import BCEWithLogitsLoss, LinearCrossEntropyLoss
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.ops import (binary_cross_entropy_with_logits, cross_entropy_loss,
                         cross_entropy_loss_grad, cross_entropy_rows, linear_cross_entropy,
                         vocab_parallel_cross_entropy_rows)
from tests.reference import (DTYPES, TOLERANCE, assert_close, assert_close_to_peak,
                             numpy_cross_entropy, rounded, to_ms, to_numpy, torch_bce_with_logits,
                             torch_cross_entropy, torch_linear_cross_entropy,
                             torch_masked_cross_entropy)

IGNORE = -100
BF16_ULP_AT_ONE = 2.0 ** -7   # spacing of bfloat16 numbers in [1, 2)
FLOAT32_EPS = 2.0 ** -23


class LossAndGrad(nn.Cell):
    """(loss, zloss, d(loss + zloss)/d input) of cross_entropy_loss, in whatever mode is set."""

    def __init__(self, weight, options):
        super().__init__()
        self.weight = weight
        self.options = options
        self.grad = ms.grad(self.total)

    def total(self, x, target):
        loss, _, zloss, _ = cross_entropy_loss(x, target, self.weight, **self.options)
        return loss.astype(ms.float32).sum() + zloss.astype(ms.float32).sum()

    def construct(self, x, target):
        loss, _, zloss, _ = cross_entropy_loss(x, target, self.weight, **self.options)
        return loss, zloss, self.grad(x, target)


def run_loss_and_grad(mode, x, target, weight, options):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    loss, zloss, grad = LossAndGrad(weight, options)(x, target)
    return to_numpy(loss), to_numpy(zloss), to_numpy(grad)


def case(n_rows, n_classes, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n_classes)) * scale).astype(np.float32)
    t = rng.integers(0, n_classes, n_rows).astype(np.int64)
    w = (rng.random(n_classes) + 0.25).astype(np.float32)
    return x, t, w


# ---- all targets ignored with reduction="mean" -------------------------------------------------

@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_all_targets_ignored_mean_gives_zero_not_nan(mode, dtype_name):
    """pytorch/pytorch#70348, #75181, #116349: F.cross_entropy(reduction="mean") returns NaN
    (0 / 0) when every target is ignore_index. Here: loss 0, z-loss 0, gradient exactly 0 (docs/semantics.md),
    with weights, label smoothing and z-loss on, for the op and for the CrossEntropyLoss Cell."""
    dtype = DTYPES[dtype_name]
    x, t, w = case(6, 11, seed=1)
    t[:] = IGNORE
    options = {"reduction": "mean", "label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.01,
               "return_zloss": True}
    loss, zloss, grad = run_loss_and_grad(mode, to_ms(x, dtype), ms.Tensor(t), ms.Tensor(w),
                                          options)
    assert loss == 0 and zloss == 0 and np.all(grad == 0)
    ref = numpy_cross_entropy(rounded(x, dtype), t, w, label_smoothing=0.1, zloss_scale=0.01)
    assert ref["loss"] == 0 and ref["zloss"] == 0 and np.all(ref["grad"] == 0)

    ms.set_context(mode=ms.PYNATIVE_MODE)
    cell = CrossEntropyLoss(weight=w, label_smoothing=0.1, lse_square_scale_for_zloss=0.01)
    mask = ms.Tensor(np.ones(6, np.float32))
    assert to_numpy(cell(to_ms(x, dtype), ms.Tensor(t), mask)) == 0
    assert np.all(to_numpy(ms.grad(cell)(to_ms(x, dtype), ms.Tensor(t), mask)) == 0)


# ---- empty batch -------------------------------------------------------------------------------

def test_empty_batch_gives_exact_zero_not_reduce_sum_garbage():
    """MindSpore 2.9's CPU ReduceSum of an empty tensor returns uninitialised memory (1e8 and
    1.4e23 seen here; HELPERS "Known pitfalls"): an N = 0 batch (e.g. a data-parallel shard or
    pipeline micro-batch with no tokens) made the CrossEntropyLoss Cell return 1e8 in 16 of 20
    calls. "mean" / "sum" / z-loss must be exactly 0, the gradient [0, C], on every call."""
    x = ms.Tensor(np.zeros((0, 7), np.float32))
    t = ms.Tensor(np.zeros((0,), np.int64))
    mask = ms.Tensor(np.zeros((0,), np.float32))
    for _ in range(10):
        for reduction in ("mean", "sum"):
            cell = CrossEntropyLoss(reduction=reduction, label_smoothing=0.1,
                                    lse_square_scale_for_zloss=0.01)
            assert to_numpy(cell(x, t, mask)).tolist() == [0.0]
            assert ms.grad(cell)(x, t, mask).shape == (0, 7)
            loss, _, zloss, _ = cross_entropy_loss(x, t, reduction=reduction, label_smoothing=0.1,
                                                   lse_square_scale_for_zloss=0.01,
                                                   return_zloss=True)
            assert float(to_numpy(loss)) == 0.0 and float(to_numpy(zloss)) == 0.0
        numerator, denominator = CrossEntropyLoss(calculate_per_token_loss=True)(x, t, mask)
        assert float(to_numpy(numerator)) == 0.0
        assert float(to_numpy(denominator)[0]) == pytest.approx(1e-8)
        bce_sum = binary_cross_entropy_with_logits(x, ms.Tensor(np.zeros((0, 7), np.float32)),
                                                   reduction="sum")
        assert float(to_numpy(bce_sum)) == 0.0


# ---- label smoothing must not count ignored rows -----------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_does_not_count_ignored_rows(reduction):
    """pytorch/pytorch#73205 (and OpenNMT / fairseq-style label-smoothing losses): the uniform
    (smoothing) part of the loss was summed over ignored rows too. The loss over a batch with
    ignored rows must equal the loss over the kept rows alone, and ignored rows get no gradient."""
    x, t, w = case(12, 9, seed=2)
    ignored = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0], bool)
    t[ignored] = IGNORE
    kept = ~ignored
    options = {"reduction": reduction, "label_smoothing": 0.3}
    full = cross_entropy_loss(ms.Tensor(x), ms.Tensor(t), ms.Tensor(w), **options)[0]
    subset = cross_entropy_loss(ms.Tensor(x[kept]), ms.Tensor(t[kept]), ms.Tensor(w),
                                **options)[0]
    ref = numpy_cross_entropy(x[kept], t[kept], w, reduction, label_smoothing=0.3)
    if reduction == "none":
        np.testing.assert_array_equal(to_numpy(full)[ignored], 0)
        full = to_numpy(full)[kept]
    assert_close(full, ref["loss"], ms.float32, "loss with ignored rows vs kept rows only")
    assert_close(subset, ref["loss"], ms.float32, "loss over kept rows")

    def total(logits):
        return cross_entropy_loss(logits, ms.Tensor(t), ms.Tensor(w), **options)[0].sum()

    grad = to_numpy(ms.grad(total)(ms.Tensor(x)))
    assert np.all(grad[ignored] == 0)
    assert_close_to_peak(grad[kept], ref["grad"], ms.float32, "grad of kept rows", ref["grad_unit"])




@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_label_smoothing_ignored_row_with_minus_inf_logits_vocab_parallel(dtype_name):
    """pytorch/pytorch#73205 in the vocabulary-parallel path (one process): an ignored row must
    contribute exactly 0 with label smoothing, also when some of its logits are -inf, as in
    cross_entropy_rows."""
    from ms_xent.ops.vocab_parallel import vocab_parallel_cross_entropy_rows

    dtype = DTYPES[dtype_name]
    x = np.array([[0.5, -np.inf, 1.0], [0.2, 0.1, 0.3]], np.float32)
    t = ms.Tensor(np.array([IGNORE, 2]))
    expected = to_numpy(cross_entropy_rows(to_ms(x, dtype), t, label_smoothing=0.1)[0])
    actual = to_numpy(vocab_parallel_cross_entropy_rows(to_ms(x, dtype), t,
                                                        label_smoothing=0.1)[0])
    assert expected[0] == 0
    np.testing.assert_array_equal(actual, expected)


# ---- weight + label smoothing + ignore_index ----------------------------------------------------

ISSUE_69339 = (np.array([[1, 2], [3, .4]], np.float32), np.array([-100, 1]), [.2, .3], -100)
ISSUE_72056 = (np.array([[0.1735, 0.2191], [-0.1377, 0.3467], [-0.2162, 0.2021],
                         [-0.1177, 0.2157], [-0.1232, 0.2620], [-0.1578, 0.4038],
                         [-0.0209, 0.3298], [-0.0639, 0.2317], [-0.3914, 0.2106],
                         [-0.4211, 0.3420]], np.float32),
               np.array([0, -1, 0, 0, 0, 0, 0, 0, -1, 0]), [1., 16.], -1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("issue", [ISSUE_69339, ISSUE_72056], ids=["pytorch69339", "pytorch72056"])
def test_weight_with_label_smoothing_and_ignore_index_does_not_crash(issue, reduction):
    """pytorch/pytorch#69339, #72056, #91383: weight + label_smoothing + ignored targets raised
    "index -100 is out of bounds" (weight[target] gathered before masking). The reporters'
    inputs, against PyTorch (since fixed) and numpy in float64."""
    x, t, weight, ignore_index = issue
    w = np.array(weight, np.float32)
    options = {"reduction": reduction, "ignore_index": ignore_index, "label_smoothing": 0.1}
    for mode in ("pynative", "graph"):
        loss, _, grad = run_loss_and_grad(mode, ms.Tensor(x), ms.Tensor(t), ms.Tensor(w), options)
        torch_loss, torch_grad, _, _ = torch_cross_entropy(x, t, w, reduction, ignore_index, 0.1)
        ref = numpy_cross_entropy(x, t, w, reduction, ignore_index, 0.1)
        assert_close(loss, torch_loss, ms.float32, f"{mode} loss vs torch")
        assert_close(loss, ref["loss"], ms.float32, f"{mode} loss vs numpy")
        assert_close_to_peak(grad, torch_grad, ms.float32, f"{mode} grad vs torch")
        assert np.all(grad[t == ignore_index] == 0)


# ---- bf16: true-class gradient at p close to 1 -------------------------------------------------

def confident_rows(deltas, n_classes, target_class=0):
    """bf16-exact logits whose softmax puts ~1 - delta on the target class of each row."""
    rows = []
    for delta in deltas:
        other = np.log(delta / (n_classes - 1))  # x_y = 0, the C - 1 others equal
        row = np.full(n_classes, other)
        row[target_class] = 0.0
        rows.append(row)
    return rounded(np.array(rows), ms.bfloat16)


def true_class_gradients(x, n_rows, target_class=0):
    """d loss / d x[:, target_class] ("mean") in the dtype of ``x`` through the three paths:
    autodiff of cross_entropy_loss, of cross_entropy_rows, and cross_entropy_loss_grad."""
    target = ms.Tensor(np.full(n_rows, target_class, np.int64))

    def mean_loss(logits):
        return cross_entropy_loss(logits, target)[0]

    def rows_mean(logits):
        return cross_entropy_rows(logits, target)[0].sum() / n_rows

    _, log_prob, _, _ = cross_entropy_loss(x, target)
    from_log_prob = cross_entropy_loss_grad(ms.Tensor(np.float32(1)).astype(x.dtype), log_prob,
                                            target)
    gradients = {"autodiff of cross_entropy_loss": ms.grad(mean_loss)(x),
                 "autodiff of cross_entropy_rows": ms.grad(rows_mean)(x),
                 "cross_entropy_loss_grad from log_prob": from_log_prob}
    return {what: grad[:, target_class] for what, grad in gradients.items()}


# The kernels add exp(x - max) in float32 SIMD lanes (at least 4 on any x86-64 build); the lane
# holding the max (~1) rounds each of its ~C / 4 small addends by up to 2^-24: an absolute error
# of up to (C / 4) * 2^-24 in sum_exp, hence in 1 - p_y.
MIN_LANES = 4


def test_bf16_true_class_gradient_is_accurate_at_p_close_to_one():
    """Liger-Kernel PR #1329 / #1341, TransformerEngine PR #3193: the true-class gradient
    p_y - 1 was formed after p_y had been rounded to bfloat16, so for p_y > 1 - 2^-9 it came out
    0 (100% error) and at p_y = 0.99 off by ~20%. Here it is computed in float32.

    Tolerance for dx_y = (p_y - 1) / N, relative: one bfloat16 rounding of the result (2^-8) plus
    the float32 summation bound (C / 4) * 2^-24 / (1 - p_y) (see MIN_LANES)."""
    n_classes = 4096
    deltas = np.array([1e-2, 1e-3])
    x = confident_rows(deltas, n_classes)
    n_rows = len(deltas)
    ref = numpy_cross_entropy(x, np.zeros(n_rows, np.int64))
    expected = ref["grad"][:, 0]
    delta = -expected * n_rows  # exact 1 - p_y of the bf16 logits
    tolerance = 2.0 ** -8 + n_classes / MIN_LANES * 2.0 ** -24 / delta
    for what, grad in true_class_gradients(to_ms(x, ms.bfloat16), n_rows).items():
        assert grad.dtype == ms.bfloat16
        actual = to_numpy(grad)
        np.testing.assert_array_less(np.abs(actual / expected - 1), tolerance, err_msg=what)
    # The failure mode this guards against: p_y rounded to bfloat16 before subtracting 1.
    naive = (rounded(np.exp(ref["log_prob"][:, 0]), ms.bfloat16) - 1) / n_rows
    assert abs(naive[1] / expected[1] - 1) > 5 * tolerance[1]


# Where the dominant class sits decides which path of the forward's single-read log-sum-exp
# (RowLogSumExp in cross_entropy_kernel.cc) sees it: the first block (two passes against its own
# max), a later block that first raises the running max by more than kDominantMargin (summed
# again against its own max), and C not a multiple of 16 with the class in the masked tail.
@pytest.mark.parametrize("n_classes, target_class", [(4096, 0), (4096, 3000), (10007, 10005)])
def test_float32_true_class_gradient_and_loss_at_p_1_minus_1e4_are_accurate(n_classes,
                                                                           target_class):
    """Same rows as above in float32 at p_y = 1 - 1e-4. Before the fix the float32 lane holding
    exp(0) = 1 swallowed its share of the small addends (~6% error in 1 - p_y; PyTorch CPU
    float32: ~6% too). Expected accuracy now: the FastExp error of p_y (a few ulps of 1, ~4 *
    2^-24 absolute) relative to 1 - p_y = 1e-4, i.e. ~2.4e-3; required: 1e-2 for the gradient,
    and for the loss (~1e-4, one rounding of lse ~ 1e-4 plus the same summation): 1e-3."""
    x = rounded(confident_rows(np.array([1e-4]), n_classes, target_class), ms.float32)
    target = np.array([target_class], np.int64)
    ref = numpy_cross_entropy(x, target)
    expected = ref["grad"][:, target_class]
    for what, grad in true_class_gradients(to_ms(x, ms.float32), 1, target_class).items():
        actual = to_numpy(grad)
        np.testing.assert_array_less(np.abs(actual / expected - 1), 1e-2, err_msg=what)
    loss = to_numpy(cross_entropy_loss(to_ms(x, ms.float32), ms.Tensor(target))[0])
    np.testing.assert_array_less(np.abs(loss / ref["loss"] - 1), 1e-3)


# ---- bf16: the scalar loss is not quantised ----------------------------------------------------

def test_bf16_loss_is_accurate_not_quantised():
    """optax#1020, TransformerEngine PR #3193, pytorch/xla#2425: with bfloat16 logits the loss was
    computed (per row, or accumulated) in bfloat16: per-row losses carry 3 significant digits and
    a bf16 running sum over thousands of rows stops growing.

    Here every row is computed and summed in float32. Justified tolerances, N = 4096 rows:
    - per-row losses (cross_entropy_rows, float32) vs float64: 2e-5 relative (TOLERANCE[float32]);
      bfloat16 rows would be off by up to 2^-9 = 2e-3.
    - the CrossEntropyLoss Cell (float32 result, as MindFormers): a float32 sum of N terms is
      within N * 2^-24 = 2.4e-4 relative of the exact sum (worst case), 8x below one bf16
      rounding; the inputs below are chosen so that bf16 rounding would miss by more.
    - the op's loss is returned in the input dtype (docs/semantics.md): it must be the float32 result rounded
      once, within one bfloat16 ulp of the exact value."""
    rng = np.random.default_rng(3)
    n_rows, n_classes = 4096, 512
    x = rounded(rng.standard_normal((n_rows, n_classes)) * 2, ms.bfloat16)
    t = rng.integers(0, n_classes, n_rows)
    ref = numpy_cross_entropy(x, t)
    ref_rows = numpy_cross_entropy(x, t, reduction="none")["loss"]
    xt, tt = to_ms(x, ms.bfloat16), ms.Tensor(t)
    cell_tolerance = n_rows * 2.0 ** -24
    quantised = float(rounded(np.float32(ref["loss"]), ms.bfloat16))
    assert abs(quantised / ref["loss"] - 1) > 4 * cell_tolerance  # bf16 would be detected

    loss_rows = cross_entropy_rows(xt, tt)[0]
    assert loss_rows.dtype == ms.float32
    assert_close(loss_rows, ref_rows, ms.float32, "per-row losses")
    cell_loss = CrossEntropyLoss()(xt, tt, ms.Tensor(np.ones(n_rows, np.float32)))
    assert cell_loss.dtype == ms.float32
    assert abs(float(to_numpy(cell_loss)[0]) / ref["loss"] - 1) < cell_tolerance
    op_loss = cross_entropy_loss(xt, tt)[0]
    assert op_loss.dtype == ms.bfloat16
    ulp = BF16_ULP_AT_ONE * 2.0 ** np.floor(np.log2(ref["loss"]))
    assert abs(float(to_numpy(op_loss)) - ref["loss"]) <= ulp


# ---- rows whose logits are all -inf but one ----------------------------------------------------

@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_rows_with_all_logits_minus_inf_but_one(dtype_name):
    """flash-attention#1930 (NaN when all logits but one are -inf, depending on where the finite
    one sits relative to the kernel's tiles; V = 100000 as in the report), pytorch/xla#2553.

    Finite entry at the target: loss 0, gradient 0. Target on a -inf logit: loss +inf (not NaN),
    gradient finite (p - onehot). Ignored rows of only -inf logits: loss, z-loss and gradient 0."""
    dtype = DTYPES[dtype_name]
    n_classes = 100000
    positions = [0, 1, 2047, 2048, 4095, 50000, n_classes - 1]
    x = np.full((len(positions) + 2, n_classes), -np.inf, np.float32)
    for row, position in enumerate(positions):
        x[row, position] = 7.0
    x[len(positions), 123] = -3.0  # target elsewhere
    t = np.array(positions + [5, IGNORE], np.int64)  # last row: all -inf and ignored
    options = {"reduction": "none", "lse_square_scale_for_zloss": 0.01, "return_zloss": True}
    loss, zloss, grad = run_loss_and_grad("pynative", to_ms(x, dtype), ms.Tensor(t), None, options)
    n = len(positions)
    assert np.all(loss[:n] == 0) and np.isposinf(loss[n]) and loss[n + 1] == 0
    assert zloss[n + 1] == 0 and np.all(np.isfinite(zloss[:n + 1]))
    assert np.all(np.isfinite(grad))
    assert np.all(grad[n + 1] == 0)
    expected = np.zeros((n + 1, n_classes))
    expected[np.arange(n), positions] = 2 * 0.01 * 7.0  # z-loss: 2 s lse p, lse = 7, p = 1
    expected[n, 123] = 1 + 2 * 0.01 * -3.0
    expected[n, 5] = -1.0
    assert_close_to_peak(grad[:n + 1], expected, dtype, "gradient")
    smoothed = cross_entropy_loss(to_ms(x[:n], dtype), ms.Tensor(t[:n]), reduction="none",
                                  label_smoothing=0.1)[0]
    assert np.all(np.isposinf(to_numpy(smoothed)))  # smoothing puts mass on impossible classes


# ---- N * C > 2^31 (32-bit offset overflow) -----------------------------------------------------

BIG_ROWS, BIG_CLASSES = 16400, 131072  # N * C = 2^31 + 16 * 2^17: 16 rows past element 2^31
BIG_BYTES = 2 * BIG_ROWS * BIG_CLASSES  # one bfloat16 [N, C] tensor: 4 GiB
# Measured (PyNative, CPU): peak RSS 8.4 GiB for the whole test, ~2.1 x the logits (assembling
# them from chunks: chunks + result; forward and backward stay below that). Required here with
# margin: 2.5 x the logits plus 1 GiB.
BIG_NEEDED = int(2.5 * BIG_BYTES) + 2 ** 30
BIG_LIMIT = 12 * 2 ** 30
BIG_CHUNK_ROWS = 512


def available_memory():
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rolled_logits(base):
    """bfloat16 [BIG_ROWS, BIG_CLASSES] with row n = base rolled by n: every row differs, so a
    row read at a wrapped 32-bit offset gives a different loss. Built in chunks, so that no
    float32 copy of the whole tensor exists."""
    chunks = []
    for start in range(0, BIG_ROWS, BIG_CHUNK_ROWS):
        rows = np.stack([np.roll(base, row) for row in range(start, min(BIG_ROWS,
                                                                          start + BIG_CHUNK_ROWS))])
        chunks.append(ms.Tensor(rows, dtype=ms.bfloat16))
    return ops.cat(chunks)


@pytest.mark.slow
def test_n_times_c_above_2_pow_31_has_no_32bit_offset_overflow():
    """pytorch/pytorch#85786, #90793, #111484: CUDA cross-entropy with more than 2^31 logits read
    and wrote at wrapped 32-bit offsets (illegal memory access or silently wrong rows).

    bfloat16 logits [16400, 131072] (N * C = 2^31 + 2^21, 4 GiB) through the memory-lean path
    (cross_entropy_rows: per-row outputs only), forward and backward once (gradient 4 GiB);
    rows before, at and after element 2^31 are compared with float64."""
    if BIG_NEEDED > BIG_LIMIT or available_memory() < BIG_NEEDED:
        pytest.skip(f"needs {BIG_NEEDED / 2 ** 30:.1f} GiB of free memory (bfloat16 logits and "
                    f"gradient of {BIG_ROWS} x {BIG_CLASSES}, 4 GiB each; measured peak 8.4 GiB), "
                    f"{available_memory() / 2 ** 30:.1f} GiB available")
    rng = np.random.default_rng(4)
    base = rounded(rng.standard_normal(BIG_CLASSES) * 3, ms.bfloat16).astype(np.float32)
    logits = rolled_logits(base)
    target = rng.integers(0, BIG_CLASSES, BIG_ROWS).astype(np.int64)
    target_t = ms.Tensor(target)
    boundary_row = 2 ** 31 // BIG_CLASSES  # its first element is element 2^31
    rows = [0, 1, boundary_row - 1, boundary_row, boundary_row + 1, BIG_ROWS - 1]
    assert boundary_row * BIG_CLASSES == 2 ** 31 and boundary_row + 1 < BIG_ROWS - 1

    def total(x):
        outputs = cross_entropy_rows(x, target_t)
        return outputs[0].sum(), outputs

    (_, (loss_rows, lse, _)), grad = ms.value_and_grad(total, has_aux=True)(logits)
    del logits
    loss_rows, lse = loss_rows.asnumpy(), lse.asnumpy()
    grad_rows = {row: to_numpy(grad[row:row + 1]) for row in rows}
    del grad
    for row in rows:
        x_row = np.roll(base.astype(np.float64), row)[None, :]
        ref = numpy_cross_entropy(x_row, target[row:row + 1], reduction="none")
        assert_close(loss_rows[row:row + 1], ref["loss"], ms.float32, f"loss row {row}")
        assert_close(lse[row:row + 1], ref["lse"], ms.float32, f"lse row {row}")
        assert_close_to_peak(grad_rows[row], ref["grad"], ms.bfloat16, f"grad row {row}")


# ---- BCE with pos_weight at extreme logits -----------------------------------------------------

@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bce_pos_weight_at_logit_minus_120_and_infinities(dtype_name, reduction):
    """pytorch/pytorch#13773 (pos_weight=1 turned a finite loss at logit -120 into NaN/inf:
    log(sigmoid(-120)) underflows), #49844 / #135359 (NaN at -inf logits). Finite logits give
    finite losses; at +-inf the values are PyTorch's (float64), NaN and inf where it has them."""
    dtype = DTYPES[dtype_name]
    x = np.array([0.0, -120.0, -120.0, 120.0, np.inf, np.inf, -np.inf, -np.inf, -100.0],
                 np.float32)
    t = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5], np.float32)
    for pos_weight in (np.ones(9, np.float32), np.full(9, 3.0, np.float32)):
        loss = binary_cross_entropy_with_logits(to_ms(x, dtype), to_ms(t, dtype),
                                                pos_weight=ms.Tensor(pos_weight),
                                                reduction=reduction)
        ref_loss, ref_grad, _ = torch_bce_with_logits(x, t, pos_weight=pos_weight,
                                                      reduction=reduction)

        def objective(logits):
            out = binary_cross_entropy_with_logits(logits, to_ms(t, dtype),
                                                   pos_weight=ms.Tensor(pos_weight),
                                                   reduction=reduction)
            return out.astype(ms.float32).sum()

        grad = to_numpy(ms.grad(objective)(to_ms(x, dtype)))
        actual = to_numpy(loss)
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(ref_loss))
        np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(ref_loss))
        finite = np.isfinite(ref_loss)
        assert_close(actual[finite], np.asarray(ref_loss)[finite], dtype, "finite losses")
        if reduction == "none":
            assert np.all(np.isfinite(actual[[0, 1, 2, 3, 8]]))  # every finite logit
            assert actual[1] == pytest.approx(120.0 * pos_weight[1], rel=TOLERANCE[dtype][0])
        assert np.all(np.isfinite(grad)) and np.all(np.isfinite(ref_grad))
        assert_close(grad, ref_grad, dtype, "gradient")


# ---- int32 vs int64 targets ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_int32_and_int64_targets_give_identical_results(mode, dtype_name):
    """PyTorch's nll_loss accepts only int64 ("expected scalar type Long but found Int", and
    "not implemented for 'Int'" on CUDA); int32 labels are common from tokenizers / datasets.
    Both are accepted here and give bit-identical loss, z-loss and gradient, with ignored rows."""
    dtype = DTYPES[dtype_name]
    x, t, w = case(33, 77, seed=5)
    t[::4] = IGNORE
    options = {"reduction": "mean", "label_smoothing": 0.05, "lse_square_scale_for_zloss": 0.01,
               "return_zloss": True}
    results = [run_loss_and_grad(mode, to_ms(x, dtype), ms.Tensor(t.astype(index)),
                                 ms.Tensor(w), options) for index in (np.int64, np.int32)]
    for as64, as32 in zip(*results):
        np.testing.assert_array_equal(as32, as64)
    ref = numpy_cross_entropy(rounded(x, dtype), t, w, "mean", IGNORE, 0.05, 0.01)
    assert_close(results[0][0], ref["loss"], dtype, "loss")
    rows64 = cross_entropy_rows(to_ms(x, dtype), ms.Tensor(t), ms.Tensor(w))
    rows32 = cross_entropy_rows(to_ms(x, dtype), ms.Tensor(t.astype(np.int32)), ms.Tensor(w))
    for a, b in zip(rows64, rows32):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_int32_targets_with_ignore_index_beyond_int32(backend):
    """Found by tests/test_fuzz.py: MindSpore converts a Python int to the tensor's dtype, so
    ``int32_target != 2**40`` compared with 0 (wrapped) and the z-loss mask and
    cross_entropy_loss_grad treated every row of class 0 as ignored (gradient 0). No int32 value
    equals 2**40: nothing is ignored, as with int64 targets."""
    x, t, w = case(9, 5, seed=8)
    t[:4] = 0
    ignore_index = 2 ** 40
    options = {"reduction": "mean", "ignore_index": ignore_index, "label_smoothing": 0.1,
               "lse_square_scale_for_zloss": 0.01}
    ref = numpy_cross_entropy(x, t, w, "mean", ignore_index, 0.1, 0.01)
    for index in (np.int32, np.int64):
        tt = ms.Tensor(t.astype(index))
        loss, log_prob, zloss, lse = cross_entropy_loss(ms.Tensor(x), tt, ms.Tensor(w),
                                                        return_zloss=True, **options)
        assert_close(loss, ref["loss"], ms.float32, f"loss {index.__name__}")
        assert_close(zloss, ref["zloss"], ms.float32, f"zloss {index.__name__}")
        one = ms.Tensor(np.float32(1))
        grad = cross_entropy_loss_grad(one, log_prob, tt, ms.Tensor(w), grad_zloss=one,
                                       lse_for_zloss=lse, **options)
        assert_close_to_peak(grad, ref["grad"] + ref["zgrad"], ms.float32,
                             f"grad {index.__name__}", ref["grad_unit"])




def test_int32_targets_with_ignore_index_beyond_int32_vocab_parallel(backend):
    """The same as above through vocab_parallel_cross_entropy_rows (one process)."""
    from ms_xent.ops.vocab_parallel import vocab_parallel_cross_entropy_rows

    x, t, w = case(9, 5, seed=8)
    t[:4] = 0
    expected = cross_entropy_rows(ms.Tensor(x), ms.Tensor(t), ignore_index=2 ** 40)
    actual = vocab_parallel_cross_entropy_rows(ms.Tensor(x), ms.Tensor(t.astype(np.int32)),
                                               ignore_index=2 ** 40)
    for name, a, b in zip(("loss_rows", "lse", "row_weight"), actual, expected):
        assert_close(a, to_numpy(b), ms.float32, name)


@pytest.mark.parametrize("ignore_index", [2 ** 32, 2 ** 40])
def test_int32_targets_with_ignore_index_beyond_int32_linear(backend, ignore_index):
    """linear_cross_entropy compared int32 targets with ignore_index directly: 2**32 wrapped to 0,
    the rows of class 0 left the "mean" denominator (3.456 instead of 2.304 on this case) and
    the gradient grew by the same factor. The oracle: the same logits through
    cross_entropy_loss with int64 targets."""
    from ms_xent.ops import linear_cross_entropy

    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((9, 4)).astype(np.float32)
    weight = rng.standard_normal((5, 4)).astype(np.float32)
    target = rng.integers(0, 5, 9)
    target[:3] = 0
    ref = numpy_cross_entropy((hidden.astype(np.float64) @ weight.T.astype(np.float64)),
                              target, None, "mean", -100, 0.0, 0.0)

    def loss_of(h):
        return linear_cross_entropy(h, ms.Tensor(weight), ms.Tensor(target.astype(np.int32)),
                                    ignore_index=ignore_index)

    loss, grad = ms.value_and_grad(loss_of)(ms.Tensor(hidden))
    assert_close(loss, ref["loss"], ms.float32, "loss")
    assert_close_to_peak(grad, ref["grad"] @ weight.astype(np.float64), ms.float32, "grad",
                         ref["grad_unit"])


# ---- ignore_index that is a valid class --------------------------------------------------------

@pytest.mark.parametrize("ignore_index", [0, 3, 8])
def test_ignore_index_that_is_a_valid_class(ignore_index):
    """chainer#5127 (an ignore label inside [0, C) raised IndexError), pytorch/pytorch#63004 (what
    it means): rows whose target is ignore_index count for nothing (no loss, no gradient, not in
    the mean's denominator), while that class still takes part in every row's softmax, as in
    PyTorch. With class weights and label smoothing, against PyTorch and numpy."""
    x, t, w = case(40, 9, seed=6)
    t[:5] = ignore_index
    options = {"reduction": "mean", "ignore_index": ignore_index, "label_smoothing": 0.1}
    loss, _, grad = run_loss_and_grad("pynative", ms.Tensor(x), ms.Tensor(t), ms.Tensor(w),
                                      options)
    torch_loss, torch_grad, _, _ = torch_cross_entropy(x, t, w, "mean", ignore_index, 0.1)
    assert_close(loss, torch_loss, ms.float32, "loss vs torch")
    assert_close_to_peak(grad, torch_grad, ms.float32, "grad vs torch")
    assert np.all(grad[t == ignore_index] == 0)
    kept = t != ignore_index
    assert np.any(grad[kept][:, ignore_index] != 0)  # the class stays in the softmax
    ref = numpy_cross_entropy(x[kept], t[kept], w, "mean", ignore_index, 0.1)
    assert_close(loss, ref["loss"], ms.float32, "loss vs kept rows only")


# ---- robustness round 2: class weights of any sign in every entry point ------------------------

SIGNED_WEIGHT = np.array([1.0, -3.0, 0.5, 2.0, -0.25], np.float32)


def signed_weight_case():
    """Rows whose counted target weights sum to -8.25 (PyTorch divides the "mean" by it)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    target = np.array([1, 1, 0, 4, 1, IGNORE], np.int64)
    return x, target


class ValueAndGrad(nn.Cell):
    """(value, d value.sum() / d first input) of a loss Cell, in whatever mode is set."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.grad = ms.grad(self.total)

    def total(self, *inputs):
        return self.loss(*inputs).sum()

    def construct(self, *inputs):
        return self.loss(*inputs), self.grad(*inputs)


def test_signed_class_weights_in_the_cross_entropy_cell(mode, backend):
    """Negative class weights were refused by the Cells (PyNative) although the op accepts them
    (PyTorch semantics); "mean" divides by a negative weight sum."""
    del mode, backend
    x, target = signed_weight_case()
    loss, grad = ValueAndGrad(CrossEntropyLoss(weight=SIGNED_WEIGHT))(ms.Tensor(x),
                                                                      ms.Tensor(target))
    want_loss, want_grad = torch_masked_cross_entropy(x, target, weight=SIGNED_WEIGHT)
    assert abs(float(want_loss)) > 0.1
    np.testing.assert_allclose(to_numpy(loss), want_loss, rtol=1e-5)
    assert_close_to_peak(to_numpy(grad), want_grad, ms.float32)


def test_signed_class_weights_in_linear_cross_entropy(mode, backend):
    del mode, backend
    x, target = signed_weight_case()
    rng = np.random.default_rng(8)
    hidden = rng.standard_normal((6, 4)).astype(np.float32)
    weight = rng.standard_normal((5, 4)).astype(np.float32)
    cell = LinearCrossEntropyLoss(weight=SIGNED_WEIGHT)
    loss, grad = ValueAndGrad(cell)(ms.Tensor(hidden), ms.Tensor(weight), ms.Tensor(target))
    want_loss, want_grads = torch_linear_cross_entropy(hidden, weight, target,
                                                       class_weight=SIGNED_WEIGHT, guard=1e-8)
    assert abs(float(want_loss)) > 0.1
    np.testing.assert_allclose(to_numpy(loss), want_loss, rtol=1e-5)
    assert_close_to_peak(to_numpy(grad), want_grads["hidden"], ms.float32)


@pytest.mark.parametrize("make", [
    lambda w: CrossEntropyLoss(weight=w),
    lambda w: LinearCrossEntropyLoss(weight=w),
], ids=["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_cells_mean_with_a_zero_weight_sum_is_zero(backend, make):
    """Weights of both signs summing to exactly 0 over the counted rows: "mean" is 0 with zero
    gradient, not the numerator over MindFormers' 1e-8 guard."""
    del backend
    x = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], np.float32)
    target = np.array([0, 1])
    weight = np.array([1.0, -1.0, 0.5], np.float32)
    cell = make(weight)
    if isinstance(cell, LinearCrossEntropyLoss):
        inputs = (ms.Tensor(x), ms.Tensor(np.eye(3, dtype=np.float32)), ms.Tensor(target))
    else:
        inputs = (ms.Tensor(x), ms.Tensor(target))
    loss, grad = ValueAndGrad(cell)(*inputs)
    assert to_numpy(loss) == 0 and not to_numpy(grad).any()


def test_signed_class_weights_in_vocab_parallel_rows(backend):
    """One process (no communication): the rows equal PyTorch's unreduced weighted losses."""
    del backend
    x, target = signed_weight_case()
    loss_rows, _, row_weight = vocab_parallel_cross_entropy_rows(
        ms.Tensor(x), ms.Tensor(target), ms.Tensor(SIGNED_WEIGHT))
    want_rows = torch_cross_entropy(x, target, SIGNED_WEIGHT, reduction="none")[0]
    np.testing.assert_allclose(to_numpy(loss_rows), want_rows, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(row_weight), [-3, -3, 1, -0.25, -3, 0])


@pytest.mark.parametrize("make", [
    lambda w: CrossEntropyLoss(weight=w),
    lambda w: LinearCrossEntropyLoss(weight=w),
], ids=["CrossEntropyLoss", "LinearCrossEntropyLoss"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_class_weight_in_a_cell_is_refused_naming_weight(make, bad):
    weight = SIGNED_WEIGHT.copy()
    weight[2] = bad
    with pytest.raises(ValueError, match=r"`weight` must be finite, got (inf|nan) at class 2"):
        make(weight)


# ---- probability targets with a class-index ignore_index ---------------------------------------

class SoftLoss(nn.Cell):
    def __init__(self, ignore_index):
        super().__init__()
        self.ignore_index = ignore_index

    def construct(self, x, target):
        return cross_entropy_loss(x, target, ignore_index=self.ignore_index)[0]


@pytest.mark.parametrize("ignore_index", [0, 3])
def test_probability_target_with_a_class_ignore_index_raises(mode, ignore_index):
    """PyTorch 2.13 raises "ignore_index is not supported for floating point target" for any
    ignore_index >= 0; ms_xent accepted it silently."""
    del mode
    x, _ = signed_weight_case()
    probabilities = ms.Tensor(np.full_like(x, 0.2))
    message = rf"`ignore_index` \({ignore_index}\) does not apply to probability targets"
    with pytest.raises(ValueError, match=message):
        SoftLoss(ignore_index)(ms.Tensor(x), probabilities)
    with pytest.raises(ValueError, match=message):
        CrossEntropyLoss(ignore_index=ignore_index)(ms.Tensor(x), probabilities)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_probability_target_with_a_negative_ignore_index_follows_pytorch(mode, ignore_index):
    del mode
    x, _ = signed_weight_case()
    probabilities = np.full_like(x, 0.2)
    loss = SoftLoss(ignore_index)(ms.Tensor(x), ms.Tensor(probabilities))
    want = torch_cross_entropy(x, probabilities, ignore_index=ignore_index)[0]
    np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-6)


# ---- bfloat16 with leading dims in GRAPH mode (MindSpore's CPU Reshape has no bf16 kernel) -----

def test_bf16_logits_with_leading_dims_in_the_cells(mode, backend):
    """[B, S, C] bfloat16 logits with class indices and with bfloat16 probability labels, and
    [B, S, H] bfloat16 hidden states in the linear Cell, failed to compile in GRAPH mode."""
    del mode, backend
    rng = np.random.default_rng(9)
    x = rounded(rng.standard_normal((2, 3, 7)) * 2, ms.bfloat16)
    target = rng.integers(0, 7, (2, 3))
    probabilities = rounded(rng.dirichlet(np.ones(7), (2, 3)), ms.bfloat16)
    for label, label_dtype in ((target, ms.int32), (probabilities, ms.bfloat16)):
        loss, grad = ValueAndGrad(CrossEntropyLoss())(to_ms(x, ms.bfloat16),
                                                      to_ms(label, label_dtype))
        flat_label = label.reshape(6) if label.ndim == 2 else label.reshape(6, 7)
        want_loss, want_grad = torch_masked_cross_entropy(x.reshape(6, 7), flat_label)
        assert_close(to_numpy(loss), want_loss, ms.bfloat16)
        assert grad.shape == (2, 3, 7) and grad.dtype == ms.bfloat16
        assert_close_to_peak(to_numpy(grad).reshape(6, 7), want_grad, ms.bfloat16)

    hidden = rounded(rng.standard_normal((2, 3, 4)), ms.bfloat16)
    weight = rounded(rng.standard_normal((7, 4)), ms.bfloat16)
    loss, grad = ValueAndGrad(LinearCrossEntropyLoss())(
        to_ms(hidden, ms.bfloat16), to_ms(weight, ms.bfloat16), ms.Tensor(target))
    want_loss, want_grads = torch_linear_cross_entropy(hidden.reshape(6, 4), weight,
                                                       target.reshape(6), guard=1e-8)
    assert_close(to_numpy(loss), want_loss, ms.bfloat16)
    assert grad.shape == (2, 3, 4)
    assert_close_to_peak(to_numpy(grad).reshape(6, 4), want_grads["hidden"], ms.bfloat16)


# ---- dynamic rank (Tensor(shape=None)) ---------------------------------------------------------

class CrossEntropyOp(nn.Cell):
    def construct(self, x, target):
        return cross_entropy_loss(x, target)[0]


class BceOp(nn.Cell):
    def construct(self, x, target):
        return binary_cross_entropy_with_logits(x, target)


@pytest.mark.parametrize("make,name", [(CrossEntropyOp, "cross_entropy_loss: `input`"),
                                       (CrossEntropyLoss, "CrossEntropyLoss: `logits`")],
                         ids=["cross_entropy_loss", "CrossEntropyLoss"])
def test_dynamic_rank_raises_a_clear_error(backend, make, name):
    """The validators crashed with "object of type 'NoneType' has no len()"."""
    del backend
    ms.set_context(mode=ms.GRAPH_MODE)
    x, target = signed_weight_case()
    cell = make()
    cell.set_inputs(ms.Tensor(shape=None, dtype=ms.float32), ms.Tensor(shape=None,
                                                                       dtype=ms.int64))
    with pytest.raises(ValueError, match=re.escape(name) + " has a dynamic rank"):
        cell(ms.Tensor(x), ms.Tensor(np.maximum(target, 0)))


@pytest.mark.parametrize("make", [BceOp, BCEWithLogitsLoss], ids=["op", "Cell"])
def test_dynamic_rank_bce_runs(backend, make):
    """Element-wise: BCE needs no rank at compile time (MindSpore's own Cell runs too)."""
    del backend
    ms.set_context(mode=ms.GRAPH_MODE)
    x, _ = signed_weight_case()
    target = np.random.default_rng(3).random(x.shape).astype(np.float32)
    cell = make()
    dynamic = ms.Tensor(shape=None, dtype=ms.float32)
    cell.set_inputs(dynamic, dynamic)
    loss = cell(ms.Tensor(x), ms.Tensor(target))
    want = torch_bce_with_logits(x, target)[0]
    np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-5)


# ---- arguments that are not mindspore.Tensor ---------------------------------------------------

def _calls():
    x, target = signed_weight_case()
    target = np.maximum(target, 0)
    xt, tt = ms.Tensor(x), ms.Tensor(target)
    return {
        "cross_entropy_loss": lambda a: cross_entropy_loss(a, tt),
        "cross_entropy_rows": lambda a: cross_entropy_rows(a, tt),
        "cross_entropy_loss_grad": lambda a: cross_entropy_loss_grad(
            ms.Tensor(np.float32(1)), a, tt),
        "vocab_parallel_cross_entropy_rows": lambda a: vocab_parallel_cross_entropy_rows(a, tt),
        "binary_cross_entropy_with_logits": lambda a: binary_cross_entropy_with_logits(a, xt),
        "linear_cross_entropy": lambda a: linear_cross_entropy(a, ms.Tensor(x[:, :4]), tt),
        "CrossEntropyLoss": lambda a: CrossEntropyLoss()(a, tt),
        "LinearCrossEntropyLoss": lambda a: LinearCrossEntropyLoss()(a, ms.Tensor(x[:, :4]), tt),
    }, x


@pytest.mark.parametrize("api", list(_calls()[0]))
@pytest.mark.parametrize("kind", ["numpy.ndarray", "list"])
def test_non_tensor_argument_is_named_with_its_type(api, kind):
    """A numpy float32 array was reported as "`input` must be float16, bfloat16 or float32, got
    float32", a list as an AttributeError."""
    calls, x = _calls()
    value = x if kind == "numpy.ndarray" else x.tolist()
    with pytest.raises(TypeError, match=rf"{api}: `\w+` must be a mindspore.Tensor, got "
                                        rf"{re.escape(kind)}"):
        calls[api](value)


def test_float64_probability_labels_name_the_supported_dtypes():
    x, _ = signed_weight_case()
    with pytest.raises(TypeError, match="`label` must be int32 or int64 class indices or float16, "
                                        "bfloat16 or float32 class probabilities, got Float64"):
        CrossEntropyLoss()(ms.Tensor(x), ms.Tensor(np.full(x.shape, 0.2)))


def test_bce_beyond_the_kernel_rank_names_the_limit():
    """Rank 17 was reported by the CPU kernel as a bad `weight` dtype."""
    x = np.zeros([1] * 16 + [2], np.float32)
    with ms_xent.use_backend("cpu"):
        with pytest.raises(ValueError, match="`input` has 17 dims; the CPU kernel takes at most 16"):
            binary_cross_entropy_with_logits(ms.Tensor(x), ms.Tensor(x))


# ---- second order and forward mode -------------------------------------------------------------

SECOND_ORDER = "not differentiable: second-order differentiation"


@pytest.mark.parametrize("loss", ["cross_entropy_loss", "binary_cross_entropy_with_logits"])
def test_second_order_and_jvp_of_the_cpu_kernels_raise_clearly(mode, loss):
    """MindSpore's "bprop not defined ... please create an issue" became ms_xent's error."""
    del mode
    x, target = signed_weight_case()
    target = ms.Tensor(np.maximum(target, 0))
    probabilities = ms.Tensor(np.full(x.shape, 0.3, np.float32))

    def function(a):
        if loss == "cross_entropy_loss":
            return cross_entropy_loss(a, target)[0]
        return binary_cross_entropy_with_logits(a, probabilities)

    with ms_xent.use_backend("cpu"):
        with pytest.raises(NotImplementedError, match=SECOND_ORDER):
            to_numpy(ms.grad(ms.grad(function))(ms.Tensor(x)))
        with pytest.raises(NotImplementedError, match=SECOND_ORDER):
            to_numpy(ms.jvp(function, ms.Tensor(x), ms.Tensor(np.ones_like(x)))[1])


@pytest.mark.parametrize("api", ["cross_entropy_loss", "cross_entropy_rows"])
def test_second_order_through_composed_rows_is_refused_or_right(mode, api):
    """The composed rows' bprop treats the saved shift as a constant, so the gradient of a
    gradient is refused: ms_xent's error in PyNative (it was silently wrong), MindSpore's compile
    error in GRAPH mode. Composed BCE's bprop is a differentiable graph: its second order matches
    PyTorch's."""
    x, target = signed_weight_case()
    target = ms.Tensor(np.maximum(target, 0))

    def rows(a):
        if api == "cross_entropy_loss":
            return cross_entropy_loss(a, target, reduction="sum")[0]
        return cross_entropy_rows(a, target)[0].sum()

    def squared_gradient(a):
        return (ms.grad(rows)(a) ** 2).sum()

    with ms_xent.use_backend("composed"):
        error = NotImplementedError if mode == "pynative" else RuntimeError
        match = "second-order differentiation" if mode == "pynative" else None
        with pytest.raises(error, match=match):
            to_numpy(ms.grad(squared_gradient)(ms.Tensor(x)))


def test_second_order_of_composed_bce_matches_torch(mode):
    import torch
    del mode
    x = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    probabilities = np.full(x.shape, 0.3, np.float32)

    def squared_gradient(a):
        return (ms.grad(lambda b: binary_cross_entropy_with_logits(
            b, ms.Tensor(probabilities)))(a) ** 2).sum()

    with ms_xent.use_backend("composed"):
        got = to_numpy(ms.grad(squared_gradient)(ms.Tensor(x)))
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        xt, torch.tensor(probabilities.astype(np.float64)))
    (first,) = torch.autograd.grad(loss, xt, create_graph=True)
    (want,) = torch.autograd.grad((first ** 2).sum(), xt)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-7)
