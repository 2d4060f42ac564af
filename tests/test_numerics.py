"""Numerics of the fused cross-entropy over the public APIs: accuracy at large common offsets and
on confident rows (float32 logits against a float64 oracle, and ahead of PyTorch float32), and
the class-weight semantics (any finite weights, PyTorch's "mean", clear errors for non-finite
weights in PyNative and GRAPH mode, no NaN from weights that give a finite loss).

``accuracy_figures()`` also prints the comparison table quoted in the README:
``PYTHONPATH=. python -c "import tests.test_numerics as t; t.print_accuracy_figures()"``.
"""

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

import ms_xent

from ms_xent.nn import CrossEntropyLoss
from ms_xent.ops import (cross_entropy_loss, cross_entropy_loss_grad, cross_entropy_rows,
                         vocab_parallel_cross_entropy_rows)
from tests.reference import IGNORE_INDEX, assert_close_to_peak, numpy_cross_entropy

# The accuracy goal for float32 logits, against float64: loss relative error and gradient error
# relative to the row's largest gradient entry.
LOSS_RTOL = 1e-5
GRAD_ATOL_OF_PEAK = 1e-6
N_CLASSES = 1000


def accuracy_cases():
    """(name, float32 logits [R, C], targets [R]): rows where lse rounded to float32, then
    lse - x[y] and exp(x - lse), lose the loss and the gradient."""
    rng = np.random.default_rng(0)
    c = N_CLASSES
    cases = []
    for offset in (1e6, 1e30, 3e38):
        x = np.full((3, c), offset, np.float32)
        x[1] = np.float32(offset) + (rng.standard_normal(c) * 4).astype(np.float32)
        x[2] = np.float32(offset) + rng.integers(-3, 1, c).astype(np.float32) * np.spacing(
            np.float32(offset))
        cases.append((f"offset {offset:g}", x, np.array([0, int(x[1].argmax()), 5])))
    for q in (1e-4, 1e-5, 1e-6, 1e-7):
        x = (rng.standard_normal((3, c)) * 0.5).astype(np.float32)
        target = np.array([7, 7, 8])
        for row in range(3):
            others = np.exp(np.delete(x[row].astype(np.float64), 7)).sum()
            x[row, 7] = np.float32(np.log(others * (1 - q) / q))  # p[7] = 1 - q
        cases.append((f"p_y = 1 - {q:g}", x, target))  # rows 0, 1: y at the max; row 2: not
    return cases


def float64_rows(x, target):
    """float64 per-row loss and d(sum of rows)/dx."""
    ref = numpy_cross_entropy(x.astype(np.float64), target, reduction="none")
    return ref["loss"], ref["grad"]


def torch_float32_rows(x, target):
    import torch
    xt = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(xt, torch.tensor(target), reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), xt)
    return loss.detach().numpy().astype(np.float64), grad.numpy().astype(np.float64)


def errors(loss, grad, want_loss, want_grad):
    """(max relative loss error, max over rows of |grad error| / max |grad| of the row)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        loss_error = np.abs(loss - want_loss) / np.abs(want_loss)
    peak = np.abs(want_grad).max(axis=1, keepdims=True)
    return float(loss_error.max()), float((np.abs(grad - want_grad) / peak).max())


def _op_rows(x, target):
    return cross_entropy_loss(x, target, reduction="none")[0]


def _rows_rows(x, target):
    return cross_entropy_rows(x, target)[0]


class _CellRows(nn.Cell):
    def __init__(self):
        super().__init__()
        self.loss = CrossEntropyLoss(reduction="none")

    def construct(self, x, target):
        return self.loss(x, target)


def _vocab_parallel_rows(x, target):
    return vocab_parallel_cross_entropy_rows(x, target)[0]


class Summed(nn.Cell):
    """sum(fn(x, target)) as a Cell: GRAPH mode differentiates Cells, not inline lambdas."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *inputs):
        return self.fn(*inputs).sum()


class Rows(nn.Cell):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, x, target):
        return self.fn(x, target)


def _differentiated(fn):
    def rows_and_grad(x, target):
        return Rows(fn)(x, target), ms.grad(Summed(fn))(x, target)
    return rows_and_grad


def _grad_op_rows(x, target):
    """cross_entropy_loss_grad from the forward's log_prob: the loss of the forward, and the
    gradient of the grad op."""
    loss, log_prob, _, _ = cross_entropy_loss(x, target, reduction="none")
    return loss, cross_entropy_loss_grad(ms.Tensor(np.ones(x.shape[0], np.float32)), log_prob,
                                         target, reduction="none")


APIS = {"cross_entropy_loss": _differentiated(_op_rows),
        "cross_entropy_rows": _differentiated(_rows_rows),
        "CrossEntropyLoss": _differentiated(_CellRows()),
        "vocab_parallel_cross_entropy_rows": _differentiated(_vocab_parallel_rows),
        "cross_entropy_loss_grad": _grad_op_rows}


def run_api(api, x, target):
    loss, grad = APIS[api](ms.Tensor(x), ms.Tensor(target))
    return loss.asnumpy().astype(np.float64).reshape(-1), grad.asnumpy().astype(np.float64)


def check_accuracy(api, case, loss_tolerance=LOSS_RTOL, grad_tolerance=GRAD_ATOL_OF_PEAK):
    name, x, target = case
    loss, grad = run_api(api, x, target)
    want_loss, want_grad = float64_rows(x, target)
    if api == "cross_entropy_loss_grad":
        # Its input is the float32 log_prob, whose rounding (|log p| 2^-24 absolute) the exact
        # gradient inherits: the oracle is the float64 gradient of that input,
        # exp(log_prob) - onehot, with expm1 for the target.
        log_prob = cross_entropy_loss(ms.Tensor(x), ms.Tensor(target), reduction="none")[1]
        log_prob = log_prob.asnumpy().astype(np.float64)
        want_grad = np.exp(log_prob)
        rows = np.arange(len(target))
        want_grad[rows, target] = np.expm1(log_prob[rows, target])
    loss_error, grad_error = errors(loss, grad, want_loss, want_grad)
    assert loss_error <= loss_tolerance, f"{api} {name}: loss relative error {loss_error:.3g}"
    assert grad_error <= grad_tolerance, f"{api} {name}: gradient error {grad_error:.3g}"


CASES = accuracy_cases()
CASE_IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_accuracy_against_float64_at_offsets_and_on_confident_rows(api, case, mode):
    """The CPU kernels' accuracy, whatever MS_XENT_BACKEND forces (composed: the next test)."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    with ms_xent.use_backend("cpu"):
        check_accuracy(api, case)


@pytest.mark.parametrize("api", sorted(APIS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_composed_backend_has_the_same_accuracy(api, case):
    """The same split from MindSpore primitives (fused softmax, no [N, 1] broadcasts); bounded by
    MindSpore's CPU exp / softmax (up to 9e-6 relative error per probability measured): the loss
    to LOSS_RTOL, the gradient to 1e-5 of the peak."""
    with ms_xent.use_backend("composed"):
        check_accuracy(api, case, loss_tolerance=1e-5, grad_tolerance=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "composed"])
@pytest.mark.parametrize("n_classes", [32000, 151936])
def test_near_uniform_rows_of_a_large_vocabulary(backend, n_classes):
    """Logits of a freshly initialised LM head: every p close to 1 / C. lse must not come from
    1 - (1 - p_max), which cancels (the composed backend once lost 1.4% of the loss at C = 151936);
    the loss to LOSS_RTOL and the gradient to GRAD_ATOL_OF_PEAK of float64."""
    rng = np.random.default_rng(n_classes)
    x = (rng.standard_normal((3, n_classes)) * 0.02).astype(np.float32)
    target = np.array([0, 17, n_classes - 1])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    with ms_xent.use_backend(backend):
        loss, grad = run_api("cross_entropy_rows", x, target)
    loss_error, grad_error = errors(loss, grad, *float64_rows(x, target))
    assert loss_error <= LOSS_RTOL, f"loss relative error {loss_error:.3g}"
    assert grad_error <= GRAD_ATOL_OF_PEAK, f"gradient error {grad_error:.3g} of the peak"


def accuracy_figures():
    """{case: (ms_xent loss error, torch float32 loss error, ms_xent grad error, torch grad
    error)} for cross_entropy_loss, against float64."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    figures = {}
    for name, x, target in CASES:
        want = float64_rows(x, target)
        ours = errors(*run_api("cross_entropy_loss", x, target), *want)
        theirs = errors(*torch_float32_rows(x, target), *want)
        figures[name] = (ours[0], theirs[0], ours[1], theirs[1])
    return figures


def print_accuracy_figures():
    print("| case | ms_xent loss rel. error | torch fp32 loss rel. error | ms_xent grad error "
          "(of peak) | torch fp32 grad error (of peak) |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in accuracy_figures().items():
        print(f"| {name} | " + " | ".join(f"{v:.2g}" for v in values) + " |")


def test_ahead_of_torch_float32_where_torch_loses_digits():
    figures = accuracy_figures()
    for name, (ours, theirs, ours_grad, theirs_grad) in figures.items():
        assert ours <= max(theirs, LOSS_RTOL) and ours_grad <= max(theirs_grad, GRAD_ATOL_OF_PEAK)
    # torch float32 really loses the confident rows (its loss error there is far above ours).
    assert figures["p_y = 1 - 1e-07"][1] > 100 * figures["p_y = 1 - 1e-07"][0]


# ---- class weights ---------------------------------------------------------------------------------

def weighted_case(weights, n_rows=40, seed=3):
    rng = np.random.default_rng(seed)
    c = len(weights)
    x = (rng.standard_normal((n_rows, c)) * 2).astype(np.float32)
    target = rng.integers(0, c, n_rows).astype(np.int64)
    target[::7] = IGNORE_INDEX
    return x, target, np.asarray(weights, np.float32)


class WeightedLoss(nn.Cell):
    def __init__(self, weight, reduction, label_smoothing=0.0):
        super().__init__()
        self.weight = ms.Tensor(weight)
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def construct(self, x, target):
        return cross_entropy_loss(x, target, self.weight, reduction=self.reduction,
                                  label_smoothing=self.label_smoothing)[0]


def run_weighted(mode, x, target, weight, reduction, label_smoothing=0.0):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    cell = WeightedLoss(weight, reduction, label_smoothing)
    xt, tt = ms.Tensor(x), ms.Tensor(target)
    loss = cell(xt, tt).asnumpy().astype(np.float64)
    grad = ms.grad(Summed(cell))(xt, tt).asnumpy().astype(np.float64)
    return loss, grad


def torch_weighted(x, target, weight, reduction, label_smoothing=0.0):
    import torch
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        xt, torch.tensor(target), weight=torch.tensor(weight.astype(np.float64)),
        reduction=reduction, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(loss.sum(), xt)
    return loss.detach().numpy(), grad.numpy()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_negative_weights_follow_pytorch(mode, reduction, label_smoothing):
    weights = np.linspace(-1.0, 2.0, 50)
    x, target, weight = weighted_case(weights)
    loss, grad = run_weighted(mode, x, target, weight, reduction, label_smoothing)
    want_loss, want_grad = torch_weighted(x, target, weight, reduction, label_smoothing)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=2e-6)
    assert_close_to_peak(grad, want_grad, ms.float32)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_mean_with_a_negative_weight_sum_divides_by_it(mode):
    x = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.0, 1.0]], np.float32)
    target = np.array([0, 1, 2])
    weight = np.array([1.0, -3.0, 0.5], np.float32)  # sum over the rows' targets: -1.5
    loss, grad = run_weighted(mode, x, target, weight, "mean")
    want_loss, want_grad = torch_weighted(x, target, weight, "mean")
    assert abs(float(want_loss)) > 0.1
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-6)


def test_mean_with_a_zero_weight_sum_is_zero():
    x = np.array([[1.0, 2.0], [0.3, -1.0]], np.float32)
    loss, grad = run_weighted("pynative", x, np.array([0, 1]), np.array([1.0, -1.0], np.float32),
                              "mean")
    assert loss == 0.0 and not grad.any()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weight_is_refused_in_pynative(bad):
    x, target, weight = weighted_case(np.ones(10))
    weight[4] = bad  # a class no row needs to target
    ms.set_context(mode=ms.PYNATIVE_MODE)
    for call in (lambda w: cross_entropy_loss(ms.Tensor(x), ms.Tensor(target), w),
                 lambda w: cross_entropy_rows(ms.Tensor(x), ms.Tensor(target), w)):
        with pytest.raises(ValueError, match="`weight` must be finite, got .* at class 4"):
            call(ms.Tensor(weight))


def test_non_finite_weight_is_refused_by_the_kernel_in_graph_mode(capfd):
    x, target, weight = weighted_case(np.ones(10))
    weight[4] = np.inf
    ms.set_context(mode=ms.GRAPH_MODE)
    with ms_xent.use_backend("cpu"), pytest.raises(RuntimeError):
        WeightedLoss(weight, "sum")(ms.Tensor(x), ms.Tensor(target)).asnumpy()
    assert "weight[4] = inf is not finite" in capfd.readouterr().err


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weights_whose_sum_overflows_float32(mode, reduction):
    x, target, weight = weighted_case(np.full(100, 1e37))  # 34 counted rows: sum 3.4e38 and more
    loss, grad = run_weighted(mode, x, target, weight, reduction)
    want_loss, want_grad = torch_weighted(x, target, weight, reduction)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    assert_close_to_peak(grad, want_grad, ms.float32)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_denormal_weights_with_mean(mode):
    x, target, weight = weighted_case(np.full(100, 1e-40))
    loss, grad = run_weighted(mode, x, target, weight, "mean")
    want_loss, want_grad = torch_weighted(x, target, weight.astype(np.float64), "mean")
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    assert_close_to_peak(grad, want_grad, ms.float32)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("scale", [1e37, 1e-40], ids=["huge", "denormal"])
@pytest.mark.parametrize("cell", ["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_cells_weighted_mean_with_extreme_weights(mode, scale, cell):
    """The Cells' weighted mean sum(w l) / sum(w) for weights whose float32 sums overflow (1e37)
    or are denormal (1e-40): PyTorch's float64 value, finite gradients."""
    x, target, _ = weighted_case(np.ones(100))
    weight = np.linspace(1.0, 3.0, 100) * scale
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if cell == "CrossEntropyLoss":
        loss_cell = CrossEntropyLoss(weight=weight.astype(np.float32))
        inputs = (ms.Tensor(x), ms.Tensor(target))
    else:
        # logits = hidden @ I: the Cell sees exactly x.
        loss_cell = ms_xent.nn.LinearCrossEntropyLoss(weight=weight.astype(np.float32))
        inputs = (ms.Tensor(x), ms.Tensor(np.eye(100, dtype=np.float32)), ms.Tensor(target))
    loss = float(loss_cell(*inputs).asnumpy().reshape(-1)[0])
    grad = ms.grad(Summed(loss_cell))(*inputs).asnumpy().astype(np.float64)
    want_loss, want_grad = torch_weighted(x, target, weight.astype(np.float32), "mean")
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    assert_close_to_peak(grad, want_grad, ms.float32)


def test_infinite_weight_sum_with_smoothing_zero_gives_no_nan_gradient():
    """eps = 0: the (eps / C) W term is not evaluated, so weights whose total overflows float32
    give the finite loss and gradient of PyTorch."""
    x, target, weight = weighted_case(np.full(400, 3e36), n_rows=8)
    loss, grad = run_weighted("pynative", x, target, weight, "none")
    want_loss, want_grad = torch_weighted(x, target, weight, "none")
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    assert_close_to_peak(grad, want_grad, ms.float32)


def test_zloss_is_unweighted_and_averaged_over_counted_rows():
    """The op's z-loss convention: z_n = m_n s lse_n^2, "mean" over the counted rows, whatever
    the class weights."""
    x, target, weight = weighted_case(np.linspace(0.1, 3.0, 30))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    _, _, zloss, _ = cross_entropy_loss(ms.Tensor(x), ms.Tensor(target), ms.Tensor(weight),
                                        lse_square_scale_for_zloss=0.01, return_zloss=True)
    counted = target != IGNORE_INDEX
    lse = np.log(np.exp(x.astype(np.float64)).sum(1))
    np.testing.assert_allclose(zloss.asnumpy(), 0.01 * (lse[counted] ** 2).mean(), rtol=1e-5)
