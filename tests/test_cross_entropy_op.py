"""The fused cross-entropy op: ms_xent.ops.cross_entropy_loss / cross_entropy_loss_grad /
cross_entropy_rows against a float64 numpy reference and PyTorch, forward and gradient, over
options, dtypes, shapes and execution modes (PyNative, GRAPH_MODE Cell, ms.jit)."""

import itertools

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from ms_xent.ops import cross_entropy_loss, cross_entropy_loss_grad, cross_entropy_rows
from tests.reference import (DTYPES, IGNORE_INDEX, assert_close, assert_close_to_peak,
                             assert_matches_torch_float32, make_case, numpy_cross_entropy, rounded,
                             to_ms, to_numpy, torch_cross_entropy)

# Every test runs on each backend (tests/conftest.py `backend`: cpu and composed).
pytestmark = pytest.mark.usefixtures("backend")

REDUCTIONS = ("mean", "sum", "none")


class OpCell(nn.Cell):
    """Runs the op in a graph; `output` selects the summed output to differentiate (or None)."""

    def __init__(self, weight, options, output=None):
        super().__init__()
        self.weight = weight
        self.options = options
        self.output = output

    def construct(self, x, target):
        outputs = cross_entropy_loss(x, target, self.weight, **self.options)
        if self.output is None:
            return outputs
        return outputs[self.output].astype(ms.float32).sum()


def run_op(mode, x, target, weight, options, dtype):
    """Forward outputs and d(sum loss)/dx, d(sum zloss)/dx as float64 numpy arrays."""
    xt = to_ms(x, dtype)
    tt = ms.Tensor(target) if target.dtype.kind == "i" else to_ms(target, dtype)
    wt = None if weight is None else ms.Tensor(weight)
    want_z = options.get("return_zloss", False)

    def outputs(a, b):
        return cross_entropy_loss(a, b, wt, **options)

    def summed_output(index):
        def total(a, b):
            return cross_entropy_loss(a, b, wt, **options)[index].astype(ms.float32).sum()
        return total

    if mode == "graph":
        ms.set_context(mode=ms.GRAPH_MODE)
        forward = OpCell(wt, options)
        differentiable = lambda index: OpCell(wt, options, index)  # noqa: E731
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        wrap = ms.jit if mode == "jit" else (lambda fn: fn)
        forward = wrap(outputs)
        differentiable = lambda index: wrap(summed_output(index))  # noqa: E731

    loss, log_prob, zloss, lse = forward(xt, tt)
    result = {"loss": to_numpy(loss), "log_prob": to_numpy(log_prob), "zloss": to_numpy(zloss),
              "lse": to_numpy(lse), "loss_dtype": loss.dtype, "zloss_shape": zloss.shape}
    result["grad"] = to_numpy(ms.grad(differentiable(0))(xt, tt))
    if want_z:
        result["zgrad"] = to_numpy(ms.grad(differentiable(2))(xt, tt))
    return result


def check_against_numpy(result, x, target, weight, options, dtype):
    ref = numpy_cross_entropy(rounded(x, dtype), target, weight, options.get("reduction", "mean"),
                              options.get("ignore_index", IGNORE_INDEX),
                              options.get("label_smoothing", 0.0),
                              options.get("lse_square_scale_for_zloss", 0.0))
    assert result["loss_dtype"] == dtype
    assert_close(result["loss"], ref["loss"], dtype, "loss")
    assert_close(result["log_prob"], ref["log_prob"], dtype, "log_prob")
    assert_close_to_peak(result["grad"], ref["grad"], dtype, "d loss / d input", ref["grad_unit"])
    if options.get("lse_square_scale_for_zloss", 0.0) > 0:
        assert_close(result["lse"], ref["lse"], ms.float32 if dtype == ms.float32 else dtype, "lse")
    else:
        assert result["lse"].shape == (0,)
    if options.get("return_zloss", False):
        assert_close(result["zloss"], ref["zloss"], dtype, "zloss")
        assert_close_to_peak(result["zgrad"], ref["zgrad"], dtype, "d zloss / d input")
    else:
        assert result["zloss_shape"] == (0,)
    return ref


def option_grid():
    """Every combination of the options (48), as (weighted, ignore_fraction, options)."""
    for weighted, ignore, eps, zscale, reduction in itertools.product(
            (False, True), (0.0, 0.25), (0.0, 0.1), (0.0, 0.02), REDUCTIONS):
        options = {"reduction": reduction, "label_smoothing": eps,
                   "lse_square_scale_for_zloss": zscale, "return_zloss": zscale > 0}
        yield pytest.param(weighted, ignore, options,
                           id=f"w{int(weighted)}-ign{ignore}-eps{eps}-z{zscale}-{reduction}")


GRID = list(option_grid())
# A spread subset of the grid for the slower modes and dtypes (every option value appears).
SUBSET = GRID[::5]


@pytest.mark.parametrize("weighted,ignore_fraction,options", GRID)
def test_every_option_float32_pynative_vs_numpy_and_torch(weighted, ignore_fraction, options):
    x, t, w = make_case(37, 1000, seed=1, ignore_fraction=ignore_fraction)
    weight = w if weighted else None
    result = run_op("pynative", x, t, weight, options, ms.float32)
    check_against_numpy(result, x, t, weight, options, ms.float32)
    assert_matches_torch_float32(result, x, t, weight, options, lambda: result["zgrad"])


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("weighted,ignore_fraction,options", SUBSET)
def test_half_dtypes_vs_numpy(dtype_name, weighted, ignore_fraction, options):
    x, t, w = make_case(29, 515, seed=2, ignore_fraction=ignore_fraction)
    weight = w if weighted else None
    result = run_op("pynative", x, t, weight, options, DTYPES[dtype_name])
    check_against_numpy(result, x, t, weight, options, DTYPES[dtype_name])


@pytest.mark.parametrize("mode", ["graph", "jit"])
@pytest.mark.parametrize("weighted,ignore_fraction,options", SUBSET)
def test_graph_and_jit_modes(mode, weighted, ignore_fraction, options):
    x, t, w = make_case(19, 300, seed=3, ignore_fraction=ignore_fraction)
    weight = w if weighted else None
    dtype = ms.bfloat16 if options["label_smoothing"] > 0 and weighted else ms.float32
    result = run_op(mode, x, t, weight, options, dtype)
    check_against_numpy(result, x, t, weight, options, dtype)


ALL_OPTIONS = {"reduction": "mean", "label_smoothing": 0.05, "lse_square_scale_for_zloss": 0.01,
               "return_zloss": True}


@pytest.mark.parametrize("n_rows,n_classes", [(1, 1), (5, 1), (3, 17), (64, 16), (257, 33),
                                              (2, 70001), (4, 2049)])
def test_shapes(n_rows, n_classes):
    x, t, w = make_case(n_rows, n_classes, seed=4, ignore_fraction=0.2)
    result = run_op("pynative", x, t, w, ALL_OPTIONS, ms.float32)
    check_against_numpy(result, x, t, w, ALL_OPTIONS, ms.float32)


# Gradients above 64 MiB take the backward's streaming-store path (kStreamingStoreBytes in
# cross_entropy_kernel.cc), with rows starting at every offset within a 64-byte line; bfloat16
# without class weights stores through a different path (Store32Unordered) than with them.
@pytest.mark.parametrize("dtype_name,n_rows,weighted", [("float32", 1025, True),
                                                        ("bfloat16", 2049, False),
                                                        ("bfloat16", 2049, True),
                                                        ("float16", 2049, False)])
def test_large_gradients_on_the_streaming_store_path(dtype_name, n_rows, weighted):
    n_classes = 16385
    x, t, w = make_case(n_rows, n_classes, seed=12, ignore_fraction=0.2)
    w = w if weighted else None
    options = {"label_smoothing": 0.1}
    result = run_op("pynative", x, t, w, options, DTYPES[dtype_name])
    check_against_numpy(result, x, t, w, options, DTYPES[dtype_name])


def test_seed_example_n4096_c8080_arange_targets():
    n_rows, n_classes = 4096, 8080
    x = np.random.default_rng(5).standard_normal((n_rows, n_classes)).astype(np.float32)
    t = np.arange(n_rows, dtype=np.int64)
    result = run_op("pynative", x, t, None, {}, ms.float32)
    loss, grad, _, _ = torch_cross_entropy(x, t)
    assert_close(result["loss"], loss, ms.float32, "loss vs torch")
    assert_close_to_peak(result["grad"], grad, ms.float32, "grad vs torch")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_probability_targets(reduction, dtype_name):
    x, t, w = make_case(23, 130, seed=6, soft=True)
    options = {"reduction": reduction, "label_smoothing": 0.1}
    result = run_op("pynative", x, t, w, options, DTYPES[dtype_name])
    check_against_numpy(result, x, rounded(t, DTYPES[dtype_name]), w, options, DTYPES[dtype_name])
    if dtype_name == "float32":
        loss, grad, _, _ = torch_cross_entropy(x, t, w, reduction, label_smoothing=0.1)
        assert_close(result["loss"], loss, ms.float32, "loss vs torch")
        assert_close_to_peak(result["grad"], grad, ms.float32, "grad vs torch")


def test_int32_and_int64_targets_agree():
    x, t, w = make_case(33, 77, seed=7, ignore_fraction=0.3)
    as64 = run_op("pynative", x, t, w, ALL_OPTIONS, ms.float32)
    as32 = run_op("pynative", x, t.astype(np.int32), w, ALL_OPTIONS, ms.float32)
    for key in ("loss", "zloss", "grad", "zgrad"):
        np.testing.assert_array_equal(as32[key], as64[key])


def test_ignore_index_that_is_a_valid_class():
    x, t, _ = make_case(40, 6, seed=8)
    options = {"ignore_index": 3, "label_smoothing": 0.1}
    result = run_op("pynative", x, t, None, options, ms.float32)
    assert (t == 3).any() and (t != 3).any()
    check_against_numpy(result, x, t, None, options, ms.float32)
    assert np.all(result["grad"][t == 3] == 0)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(mode, reduction):
    x, t, w = make_case(8, 50, seed=9)
    t[:] = IGNORE_INDEX
    options = {"reduction": reduction, "label_smoothing": 0.2, "lse_square_scale_for_zloss": 0.1,
               "return_zloss": True}
    result = run_op(mode, x, t, w, options, ms.float32)
    for key in ("loss", "zloss", "grad", "zgrad"):
        assert np.all(result[key] == 0), key


def test_large_common_offset_keeps_float32_accuracy():
    offset = 1000.0
    x, t, w = make_case(16, 4000, seed=10, offset=offset)
    options = {"label_smoothing": 0.3, "reduction": "none"}
    result = run_op("pynative", x, t, w, options, ms.float32)
    ref = numpy_cross_entropy(x, t, w, reduction="none", label_smoothing=0.3)
    # float32 resolves lse ~ 1010 to ~6e-5; allow a few of those, nothing like the cancellation
    # of W * lse - sum_c w[c] x[c] (~4e6 in magnitude) without the kernel's reference shift.
    ulp_at_offset = np.spacing(np.float32(offset))
    np.testing.assert_allclose(result["loss"], ref["loss"], rtol=0, atol=8 * ulp_at_offset)
    assert_close_to_peak(result["grad"], ref["grad"], ms.float32)


def test_non_finite_logits_propagate_and_all_but_one_minus_inf_is_finite():
    x, t, _ = make_case(4, 3000, seed=11)
    x[0, 5] = np.nan
    x[1, 7] = np.inf  # lse = inf - inf: NaN (PyTorch gives inf); either way not silently finite
    x[2, :] = -np.inf
    x[2, t[2]] = 0.0  # only the target is finite: loss 0, gradient 0
    x[3, :2500] = -np.inf  # a whole kernel block of -inf before the finite values
    t[3] = 2700
    result = run_op("pynative", x, t, None, {"reduction": "none"}, ms.float32)
    assert np.isnan(result["loss"][0]) and np.isnan(result["loss"][1])
    assert result["loss"][2] == 0.0 and np.all(result["grad"][2] == 0.0)
    ref = numpy_cross_entropy(x[3:], t[3:], reduction="none")
    assert_close(result["loss"][3:], ref["loss"], ms.float32)
    assert_close_to_peak(result["grad"][3:], ref["grad"], ms.float32)


def test_empty_batch():
    x = np.zeros((0, 10), np.float32)
    t = np.zeros((0,), np.int64)
    for reduction in REDUCTIONS:
        result = run_op("pynative", x, t, None, {"reduction": reduction, "return_zloss": True,
                                                 "lse_square_scale_for_zloss": 0.1}, ms.float32)
        assert result["grad"].shape == (0, 10)
        assert result["loss"].shape == ((0,) if reduction == "none" else ())
        assert np.all(result["loss"] == 0)


def test_dynamic_batch_size_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    cell = OpCell(None, {"label_smoothing": 0.1}, output=0)
    cell.set_inputs(ms.Tensor(shape=[None, 64], dtype=ms.float32),
                    ms.Tensor(shape=[None], dtype=ms.int64))
    for n_rows in (5, 17, 1):
        x, t, _ = make_case(n_rows, 64, seed=n_rows)
        loss = cell(ms.Tensor(x), ms.Tensor(t))
        grad = ms.grad(cell)(ms.Tensor(x), ms.Tensor(t))
        ref = numpy_cross_entropy(x, t, label_smoothing=0.1)
        assert_close(loss, ref["loss"], ms.float32)
        assert_close_to_peak(grad, ref["grad"], ms.float32)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_loss_grad_from_log_prob(dtype_name, reduction):
    dtype = DTYPES[dtype_name]
    x, t, w = make_case(21, 200, seed=12, ignore_fraction=0.25)
    options = {"reduction": reduction, "label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.05}
    ref = numpy_cross_entropy(rounded(x, dtype), t, w, ignore_index=IGNORE_INDEX,
                              reduction=reduction, label_smoothing=0.1, zloss_scale=0.05)
    _, log_prob, _, lse = cross_entropy_loss(to_ms(x, dtype), ms.Tensor(t), ms.Tensor(w),
                                             return_zloss=True, **options)
    upstream = np.ones(21, np.float32) if reduction == "none" else np.float32(1.0)
    grad = cross_entropy_loss_grad(to_ms(upstream, dtype), log_prob, ms.Tensor(t), ms.Tensor(w),
                                   grad_zloss=to_ms(upstream, dtype), lse_for_zloss=lse, **options)
    assert grad.dtype == dtype
    assert_close_to_peak(grad, ref["grad"] + ref["zgrad"], dtype, "grad_input")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_cross_entropy_rows_memory_lean_building_block(dtype_name):
    dtype = DTYPES[dtype_name]
    x, t, w = make_case(31, 333, seed=13, ignore_fraction=0.2)
    xt = to_ms(x, dtype)

    def scalar(logits):
        loss_rows, lse, _ = cross_entropy_rows(logits, ms.Tensor(t), ms.Tensor(w),
                                               label_smoothing=0.1)
        return loss_rows.sum() + 0.01 * (lse * lse).sum()

    loss_rows, lse, row_weight = cross_entropy_rows(xt, ms.Tensor(t), ms.Tensor(w),
                                                    label_smoothing=0.1)
    ref = numpy_cross_entropy(rounded(x, dtype), t, w, reduction="none", label_smoothing=0.1)
    mask = t != IGNORE_INDEX
    assert loss_rows.dtype == ms.float32 and lse.dtype == ms.float32
    assert_close(loss_rows, ref["loss"], ms.float32, "loss_rows")
    assert_close(lse, ref["lse"], ms.float32, "lse")
    np.testing.assert_allclose(to_numpy(row_weight), np.where(mask, w[np.where(mask, t, 0)], 0))
    prob = np.exp(ref["log_prob"])
    expected_grad = ref["grad"] + 0.02 * ref["lse"][:, None] * prob
    assert_close_to_peak(ms.grad(scalar)(xt), expected_grad, dtype, "grad")


BAD_INPUTS = [
    ("input_rank", dict(x=np.zeros(5, np.float32)), ValueError, "`input` must be 2-D"),
    ("input_dtype", dict(x=np.zeros((5, 3), np.int32)), TypeError, "`input` must be float16"),
    ("zero_classes", dict(x=np.zeros((5, 0), np.float32)), ValueError, "C > 0"),
    ("target_rank", dict(t=np.zeros((5, 2), np.int64)), ValueError, "`target` must be 1-D"),
    ("target_dtype", dict(t=np.zeros(5, np.uint8)), TypeError, "`target` must be int32 or int64"),
    ("target_rows", dict(t=np.zeros(4, np.int64)), ValueError, "`target` has 4 rows"),
    ("soft_target_shape", dict(t=np.zeros((5, 2), np.float32)), ValueError, "probability `target`"),
    ("target_too_large", dict(t=np.array([0, 1, 3, 0, 0])), ValueError, r"value 3 at position 2 is outside \[0, 3\)"),
    ("target_negative", dict(t=np.array([0, -5, 0, 0, 0])), ValueError, "value -5 at position 1"),
    ("weight_length", dict(w=np.ones(4, np.float32)), ValueError, r"`weight` must have shape \(3,\)"),
    ("weight_inf", dict(w=np.array([1, np.inf, 1], np.float32)), ValueError, "`weight` must be finite, got inf at class 1"),
    ("weight_nan", dict(w=np.array([1, 1, np.nan], np.float32)), ValueError, "`weight` must be finite, got nan at class 2"),
    ("softcap_negative", dict(logit_softcap=-1.0), ValueError, "`logit_softcap` must be >= 0"),
    ("scale_zero", dict(logit_scale=0.0), ValueError, "`logit_scale` must be non-zero"),
    ("weight_dtype", dict(w=np.ones(3, np.int32)), TypeError, "`weight` must be float16, bfloat16 or float32"),
    ("reduction", dict(reduction="avg"), ValueError, "`reduction` must be one of"),
    ("smoothing_high", dict(label_smoothing=1.0), ValueError, r"`label_smoothing` must be in \[0, 1\)"),
    ("smoothing_negative", dict(label_smoothing=-0.1), ValueError, "`label_smoothing`"),
    ("zloss_scale", dict(lse_square_scale_for_zloss=1.5), ValueError, "`lse_square_scale_for_zloss`"),
    ("ignore_index_type", dict(ignore_index=1.5), TypeError, "`ignore_index` must be an int"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(case):
    _, changes, error, message = case
    x = changes.get("x", np.zeros((5, 3), np.float32))
    t = changes.get("t", np.zeros(5, np.int64))
    w = changes.get("w")
    options = {k: v for k, v in changes.items() if k not in ("x", "t", "w")}
    with pytest.raises(error, match=message):
        cross_entropy_loss(ms.Tensor(x), ms.Tensor(t), None if w is None else ms.Tensor(w),
                           **options)


def test_bad_input_in_graph_mode(backend):
    ms.set_context(mode=ms.GRAPH_MODE)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        OpCell(None, {"reduction": "avg"})(ms.Tensor(np.zeros((5, 3), np.float32)),
                                           ms.Tensor(np.zeros(5, np.int64)))
    # Target values are unknown when the graph is compiled. The kernel checks them and never
    # indexes with them; MindSpore raises when the kernel reports the error.
    x = ms.Tensor(np.zeros((5, 3), np.float32))
    target = ms.Tensor(np.array([0, 1, 7, -2, 0], np.int64))
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="XentHardForward"):
            OpCell(None, {})(x, target)[0].asnumpy()
        return
    # The composed backend gives such rows a NaN loss and a NaN gradient (never a wrapped index).
    loss = OpCell(None, {"reduction": "none"})(x, target)[0].asnumpy()
    grad = ms.grad(OpCell(None, {"reduction": "none"}, 0))(x, target).asnumpy()
    bad = np.array([False, False, True, True, False])
    assert np.all(np.isnan(loss[bad])) and np.all(np.isfinite(loss[~bad]))
    assert np.all(np.isnan(grad[bad])) and np.all(np.isfinite(grad[~bad]))


def test_grad_op_rejects_bad_input():
    log_prob = ms.Tensor(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="cross_entropy_loss_grad: `reduction`"):
        cross_entropy_loss_grad(ms.Tensor(np.float32(1)), log_prob, ms.Tensor(np.zeros(5, np.int64)),
                                reduction="bad")
    with pytest.raises(ValueError, match="cross_entropy_loss_grad: `target` value 9"):
        cross_entropy_loss_grad(ms.Tensor(np.float32(1)), log_prob,
                                ms.Tensor(np.full(5, 9, np.int64)))


# ---- logit scale / softcap, argmax, gradient w.r.t. probability targets --------------------------

def torch_mapped_cross_entropy(x, target, weight, reduction, label_smoothing, logit_scale,
                               logit_softcap, ignore_index=IGNORE_INDEX):
    """PyTorch float64: F.cross_entropy of z = cap tanh(s x / cap) (or s x), which torch does not
    offer itself; returns (loss, d sum(loss) / dx, d sum(loss) / dtarget or None)."""
    import torch
    import torch.nn.functional as F

    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    soft = np.asarray(target).ndim == 2
    tt = torch.tensor(np.asarray(target, np.float64 if soft else np.int64), requires_grad=soft)
    z = logit_scale * xt
    if logit_softcap > 0:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = F.cross_entropy(z, tt, weight=wt, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss.sum(), (xt, tt) if soft else (xt,))
    return (loss.detach().numpy(), grads[0].numpy(),
            grads[1].numpy() if soft else None)


LOGIT_MAPS = [(0.5, 0.0), (1.0, 30.0), (-2.0, 5.0), (3.0, 2.0)]


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("logit_scale,logit_softcap", LOGIT_MAPS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logit_scale_and_softcap_vs_torch_float64(mode, logit_scale, logit_softcap, reduction):
    x, t, w = make_case(23, 300, seed=11, ignore_fraction=0.2)
    options = {"reduction": reduction, "label_smoothing": 0.1, "logit_scale": logit_scale,
               "logit_softcap": logit_softcap}
    result = run_op(mode, x, t, w, options, ms.float32)
    loss, grad, _ = torch_mapped_cross_entropy(x, t, w, reduction, 0.1, logit_scale,
                                               logit_softcap)
    assert_close(result["loss"], loss, ms.float32, "loss vs torch")
    # dz/dx = s (1 - (z / cap)^2) loses float32 digits where tanh saturates, as in any framework.
    tolerance = 2e-6 if logit_softcap == 0 else 2e-5
    np.testing.assert_allclose(result["grad"], grad, atol=tolerance * np.abs(grad).max(),
                               err_msg="grad vs torch")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_logit_softcap_on_cross_entropy_rows_and_half_dtypes(dtype_name):
    dtype = DTYPES[dtype_name]
    x, t, w = make_case(17, 2100, seed=12, ignore_fraction=0.2)
    xr = rounded(x, dtype)

    def rows_sum(a):
        loss_rows, lse, _ = cross_entropy_rows(a, ms.Tensor(t), ms.Tensor(w), logit_scale=0.7,
                                               logit_softcap=4.0)
        return loss_rows.sum() + 0.01 * (lse * lse).sum()

    xt = to_ms(x, dtype)
    loss_rows = to_numpy(cross_entropy_rows(xt, ms.Tensor(t), ms.Tensor(w), logit_scale=0.7,
                                            logit_softcap=4.0)[0])
    want_rows, _, _ = torch_mapped_cross_entropy(xr, t, w, "none", 0.0, 0.7, 4.0)
    assert_close(loss_rows, want_rows, dtype, "loss_rows")
    grad = to_numpy(ms.grad(rows_sum)(xt))
    import torch
    xt64 = torch.tensor(xr, requires_grad=True)
    z = 4.0 * torch.tanh(0.7 * xt64 / 4.0)
    lse = torch.logsumexp(z, 1)
    rows = torch.nn.functional.cross_entropy(z, torch.tensor(t), weight=torch.tensor(
        w.astype(np.float64)), reduction="none")
    (want,) = torch.autograd.grad(rows.sum() + 0.01 * (lse * lse).sum(), xt64)
    np.testing.assert_allclose(grad, want.numpy(), atol=(2e-5 if dtype == ms.float32 else 2e-2)
                               * np.abs(want.numpy()).max())


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_argmax_output_gives_predicted_tokens_and_token_accuracy(mode, index_dtype):
    rng = np.random.default_rng(13)
    x = rng.integers(-3, 4, (41, 2100)).astype(np.float32)  # many ties: the first index wins
    x[5, 2050] = 9.0  # the max in the second block of 2048
    x[6, :] = 1.0
    x[7, 100] = np.nan  # NaN counts as the largest, as torch.argmax
    t = rng.integers(0, 2100, 41).astype(index_dtype)
    t[:10] = x[:10].argmax(1)
    t[3] = IGNORE_INDEX
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)

    class Rows(nn.Cell):
        def construct(self, a, b):
            return cross_entropy_rows(a, b, logit_scale=-1.0, return_argmax=True)

    outputs = Rows()(ms.Tensor(x), ms.Tensor(t))
    assert len(outputs) == 4
    argmax = outputs[3].asnumpy()
    assert argmax.dtype == index_dtype
    import torch
    want = torch.argmax(torch.tensor(-x.astype(np.float64)), dim=1).numpy()
    np.testing.assert_array_equal(argmax, want)
    counted = t != IGNORE_INDEX
    accuracy = ((argmax == t) & counted).sum() / counted.sum()
    assert accuracy == ((want == t) & counted).sum() / counted.sum()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted,label_smoothing", [(False, 0.0), (True, 0.2)])
def test_gradient_wrt_probability_targets_vs_torch_float64(mode, reduction, weighted,
                                                          label_smoothing):
    x, t, w = make_case(13, 257, seed=14, soft=True)
    weight = w if weighted else None
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    wt = None if weight is None else ms.Tensor(weight)

    class Loss(nn.Cell):
        def construct(self, a, b):
            return cross_entropy_loss(a, b, wt, reduction=reduction,
                                      label_smoothing=label_smoothing)[0].sum()

    grad_x, grad_t = ms.grad(Loss(), grad_position=(0, 1))(ms.Tensor(x), ms.Tensor(t))
    _, want_x, want_t = torch_mapped_cross_entropy(x, t, weight, reduction, label_smoothing, 1.0,
                                                   0.0)
    assert_close_to_peak(grad_x, want_x, ms.float32, "d loss / d input")
    assert_close_to_peak(grad_t, want_t, ms.float32, "d loss / d target")
    # The Cells' building block too.
    class RowsLoss(nn.Cell):
        def construct(self, a, b):
            return cross_entropy_rows(a, b, wt, label_smoothing=label_smoothing)[0].sum()

    grad_t = ms.grad(RowsLoss(), grad_position=1)(ms.Tensor(x), ms.Tensor(t))
    _, _, want_t = torch_mapped_cross_entropy(x, t, weight, "sum", label_smoothing, 1.0, 0.0)
    assert_close_to_peak(grad_t, want_t, ms.float32, "rows: d loss / d target")
