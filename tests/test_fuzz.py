"""Property / fuzz tests of the fused losses with hypothesis.

Property: every generated call either matches the float64 reference of ``tests/reference.py``
(per-dtype TOLERANCE, widened only by the documented float32 limits below) or raises a
TypeError / ValueError whose message names the offending argument in backticks. Nothing crashes,
and a non-finite reference value (NaN / Inf logits) is never returned as a finite number.

All calls run in PYNATIVE mode (the op test modules cover GRAPH mode and ms.jit; a graph compile
per generated shape would not fit the budget).

Generated cases cover, for ``cross_entropy_loss`` (forward + autodiff gradient of loss and
z-loss), ``cross_entropy_rows`` (per-row loss, lse, row weight + gradient through both),
``cross_entropy_loss_grad`` (gradient from ``log_prob``), ``vocab_parallel_cross_entropy_rows`` in
one process (like ``cross_entropy_rows``) and the ``CrossEntropyLoss`` Cell (with a random
``input_mask``, MindFormers' ``+ 1e-8`` denominator):
shapes N = 0, N = 1, odd N, N * C above the kernels' OpenMP threshold, C = 1, C around the
vector width (16) and the kernel block (2048), C > 65536; float32 / float16 / bfloat16 logits;
int32 / int64 / probability targets; weights (none, positive, with zeros, all zero, half
dtypes); ignore_index (-100, -1, a valid class, beyond C, int32 min, beyond int32); label
smoothing; z-loss; every reduction; logits with -inf entries, rows that are -inf but for one
entry, whole -inf rows, NaN, +inf, huge (+-6e4), tiny (1e-30), constant and rising rows
(the running max changes in every kernel block).
Bad values: targets out of range (incl. int64 extremes), wrong target / input / weight dtypes,
ranks and shapes, C = 0, non-finite weights, bad reduction / smoothing / z-loss scale /
ignore_index.

For ``binary_cross_entropy_with_logits`` (forward + gradients w.r.t. input and target, against
PyTorch in float64): rank 0 to 4, zero-size dims, more elements than the kernel's parallel
threshold; weight / pos_weight absent or of any broadcastable shape (leading dims dropped, dims
of size 1) and dtype; input and target dtypes mixed; every reduction name and integer code;
logits -120 / +120, +-inf, NaN, +-6e4, +-1e-30. Bad values: target shape / dtype, input dtype,
weight / pos_weight not broadcastable, negative or not a Tensor, bad reduction.

For ``linear_cross_entropy`` (loss, numerator / denominator, and gradients w.r.t. hidden,
weight and bias, against PyTorch in float64): N = 1 or more (N = 0 is left out, see
``linear_cases``), H and V from 1, V around the 2048 block, several chunks, bias, class weights,
ignore_index, smoothing, z-loss, softcap, negative logit scale, float / bool input masks, every
reduction and ``return_per_token``.

Reference conventions (PyTorch semantics): an ignored row contributes nothing to loss, z-loss
or gradient, whatever its logits hold; its ``log_prob`` and ``lse`` are still those of its logits.

Tolerance: TOLERANCE[dtype] (``rtol``, ``atol``; gradients: ``atol`` relative to the gradient's
peak, as ``assert_close_to_peak``), plus, for logits of magnitude up to M, 4 float32 ulps of M:
the kernels hold lse in float32, which resolves it to ulp(M), so p = exp(x - lse) carries a
relative error ~ulp(M) and l = lse - x[y] an absolute one (e.g. M = 3000: 2.4e-4; M = 6e4:
3.9e-3). ``cross_entropy_loss_grad`` recomputes p from ``log_prob`` stored in the input dtype:
its gradient tolerance is widened by that rounding, |log p| * 2^-(mantissa bits + 1) relative.

Budget (deterministic: ``derandomize=True``, no example database, ``deadline=None``):
``VALID_EXAMPLES`` valid cross-entropy calls, ``BAD_EXAMPLES_PER_PAIR`` bad calls for each
(API, kind of bad value) pair, ``BCE_EXAMPLES`` valid BCE calls and
2 * ``BAD_EXAMPLES_PER_PAIR`` bad BCE calls per kind, ``LINEAR_EXAMPLES`` linear cross-entropy
calls. Each test asserts that all of its examples ran (the valid-call tests
also that the generated cases covered every corner listed above), and the module prints the
counts at its end (``ms_xent fuzz: <total> cases (...)``).
"""

import collections
import dataclasses

import numpy as np
import pytest
import mindspore as ms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms_xent.ops import (binary_cross_entropy_with_logits, cross_entropy_loss,
                         cross_entropy_loss_grad, cross_entropy_rows)
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.ops.linear_cross_entropy import linear_cross_entropy
from ms_xent.ops.vocab_parallel import vocab_parallel_cross_entropy_rows
from tests.reference import (DTYPES, TOLERANCE, numpy_cross_entropy, rounded, to_ms, to_numpy,
                             torch_bce_with_logits, torch_linear_cross_entropy)

VALID_EXAMPLES = 340
BAD_EXAMPLES_PER_PAIR = 3
BCE_EXAMPLES = 150

FUZZ = settings(max_examples=VALID_EXAMPLES, derandomize=True, database=None, deadline=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CASES_RUN = collections.Counter()
COVERAGE = collections.defaultdict(set)

# Mantissa bits of each dtype: its relative rounding step is 2^-(bits + 1).
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


@pytest.fixture(scope="module", autouse=True)
def report_case_counts(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None and CASES_RUN:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(CASES_RUN.items()))
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"\nms_xent fuzz: {sum(CASES_RUN.values())} cases ({counts})")


def run_counted(name, fuzz, minimum, required_coverage=None):
    """Runs the hypothesis test ``fuzz``; asserts it ran ``minimum`` cases and saw every value of
    ``required_coverage`` ({feature: set of values}) at least once."""
    CASES_RUN[name] = 0
    COVERAGE.clear()
    fuzz()
    assert CASES_RUN[name] >= minimum, f"{name}: only {CASES_RUN[name]} cases ran"
    for feature, values in (required_coverage or {}).items():
        missing = set(values) - COVERAGE[feature]
        assert not missing, f"{name}: no generated case had {feature} in {sorted(missing)}"


# ---- valid cross-entropy cases -----------------------------------------------------------------

SHAPE_KINDS = ("empty", "single_row", "one_class", "vector_edge", "block_edge", "wide", "small",
               "parallel")
LOGIT_KINDS = ("normal", "rising", "minus_inf_some", "all_but_one_minus_inf", "minus_inf_rows",
               "nan", "plus_inf", "huge", "tiny", "constant")
IGNORE_KINDS = ("default", "minus_one", "valid_class", "beyond_classes", "int32_min",
                "beyond_int32")
# Probability targets refuse an ignore_index >= 0 (as PyTorch does): valid calls use these.
NEGATIVE_IGNORE_KINDS = ("default", "minus_one", "int32_min")
WEIGHT_KINDS = ("none", "positive", "with_zeros", "all_zero")
APIS = ("cross_entropy_loss", "cross_entropy_rows", "cross_entropy_loss_grad",
        "vocab_parallel_cross_entropy_rows", "CrossEntropyLoss")


@dataclasses.dataclass(frozen=True)
class Case:
    """Generation parameters of one call; the arrays are derived from them deterministically."""

    api: str
    dtype: str
    n_rows: int
    n_classes: int
    logits: str
    scale: float
    offset: float
    target_kind: str  # "int32", "int64" or "probabilities"
    target_dtype: str  # dtype of probability targets
    ignore: str
    ignore_fraction: float
    weight: str
    weight_dtype: str
    reduction: str
    label_smoothing: float
    zloss_scale: float
    return_zloss: bool
    seed: int

    @property
    def soft(self):
        return self.target_kind == "probabilities"

    def ignore_index(self, rng):
        return {"default": -100, "minus_one": -1, "beyond_classes": self.n_classes + 3,
                "int32_min": -2 ** 31, "beyond_int32": 2 ** 40,
                "valid_class": int(rng.integers(0, self.n_classes))}[self.ignore]

    def arrays(self):
        """(logits float32 [N, C], target, weight float32 [C] or None, ignore_index)."""
        rng = np.random.default_rng(self.seed)
        n, c = self.n_rows, self.n_classes
        ignore_index = self.ignore_index(rng)
        x = rng.standard_normal((n, c)) * self.scale + self.offset
        target = rng.integers(0, c, n)
        rows = rng.random(n) < 0.5
        if self.logits == "rising":
            x = np.linspace(-10 * self.scale, 10 * self.scale, c) + 0.01 * x + self.offset
        elif self.logits == "minus_inf_some":
            x[rng.random((n, c)) < 0.3] = -np.inf
        elif self.logits == "all_but_one_minus_inf":
            keep = np.where(rows, target, rng.integers(0, c, n))
            finite = x[np.arange(n), keep]
            x[:] = -np.inf
            x[np.arange(n), keep] = finite
        elif self.logits == "minus_inf_rows":
            x[rows] = -np.inf
        elif self.logits in ("nan", "plus_inf"):
            x[rows, rng.integers(0, c)] = np.nan if self.logits == "nan" else np.inf
        elif self.logits == "huge":
            x = rng.uniform(-6e4, 6e4, (n, c))
        elif self.logits == "tiny":
            x = x * 1e-30
        elif self.logits == "constant":
            x = np.full((n, c), self.offset)
        if self.soft:
            t = rng.random((n, c)) * (rng.random((n, c)) > 0.3)
            if rng.random() < 0.7:
                t = t / np.maximum(t.sum(axis=1, keepdims=True), 1e-3)
            target = t.astype(np.float32)
        else:
            index_dtype = np.int32 if self.target_kind == "int32" else np.int64
            ignored = rng.random(n) < self.ignore_fraction
            if np.iinfo(index_dtype).min <= ignore_index <= np.iinfo(index_dtype).max:
                target[ignored] = ignore_index
            target = target.astype(index_dtype)
        weight = None
        if self.weight != "none":
            weight = rng.random(c) + 0.25
            if self.weight == "with_zeros":
                weight[rng.random(c) < 0.3] = 0.0
            elif self.weight == "all_zero":
                weight[:] = 0.0
            weight = rounded(weight, DTYPES[self.weight_dtype]).astype(np.float32)
        return x.astype(np.float32), target, weight, ignore_index


@st.composite
def valid_cases(draw):
    kind = draw(st.sampled_from(SHAPE_KINDS))
    n_rows = draw(st.integers(2, 40))
    n_classes = draw(st.integers(2, 64))
    if kind == "empty":
        n_rows = 0
    elif kind == "single_row":
        n_rows = 1
    elif kind == "one_class":
        n_classes = 1
    elif kind == "vector_edge":
        n_classes = draw(st.sampled_from([15, 16, 17, 31, 32, 33, 47, 48, 49]))
    elif kind == "block_edge":
        n_classes = draw(st.sampled_from([2047, 2048, 2049, 4095, 4097]))
        n_rows = draw(st.integers(1, 5))
    elif kind == "wide":
        n_classes = draw(st.integers(65537, 66000))
        n_rows = draw(st.integers(1, 2))
    elif kind == "parallel":  # N * C above the kernels' OpenMP threshold (32768)
        n_rows = draw(st.integers(257, 601))
        n_classes = draw(st.integers(64, 130))
    target_kind = draw(st.sampled_from(["int64", "int32", "probabilities"]))
    api = draw(st.sampled_from(APIS))
    zloss_scale = draw(st.sampled_from([0.0, 1e-4, 0.05]))
    return Case(
        api=api,
        dtype=draw(st.sampled_from(list(DTYPES))),
        n_rows=n_rows,
        n_classes=n_classes,
        logits=draw(st.sampled_from(LOGIT_KINDS)),
        scale=draw(st.sampled_from([0.01, 1.0, 4.0, 30.0])),
        offset=draw(st.sampled_from([0.0, 0.0, 20.0, -200.0, 3000.0])),
        target_kind=target_kind,
        target_dtype=draw(st.sampled_from(list(DTYPES))),
        ignore=draw(st.sampled_from(NEGATIVE_IGNORE_KINDS if target_kind == "probabilities"
                                    else IGNORE_KINDS)),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        weight=draw(st.sampled_from(WEIGHT_KINDS)),
        weight_dtype=draw(st.sampled_from(list(DTYPES))),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.6, 0.999])),
        zloss_scale=zloss_scale,
        return_zloss=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def record_coverage(case, x):
    COVERAGE["shape"].add("N=0" if case.n_rows == 0 else "N=1" if case.n_rows == 1 else "N>1")
    COVERAGE["shape"].add("odd N" if case.n_rows % 2 else "even N")
    COVERAGE["shape"].add("C=1" if case.n_classes == 1 else "C>65536" if case.n_classes > 65536
                          else "C%16!=0" if case.n_classes % 16 else "C%16==0")
    COVERAGE["shape"].add("N*C>32768" if x.size > 32768 else "N*C<=32768")
    for name in ("api", "dtype", "logits", "target_kind", "ignore", "weight", "reduction"):
        COVERAGE[name].add(getattr(case, name))
    COVERAGE["options"].add(f"smoothing>0:{case.label_smoothing > 0}")
    COVERAGE["options"].add(f"zloss:{case.zloss_scale > 0 and case.return_zloss}")


VALID_COVERAGE = {
    "shape": {"N=0", "N=1", "odd N", "C=1", "C>65536", "C%16!=0", "N*C>32768"},
    "api": set(APIS), "dtype": set(DTYPES), "logits": set(LOGIT_KINDS),
    "target_kind": {"int32", "int64", "probabilities"}, "ignore": set(IGNORE_KINDS),
    "weight": set(WEIGHT_KINDS), "reduction": {"mean", "sum", "none"},
    "options": {"smoothing>0:True", "zloss:True"},
}


def assert_matches(actual, expected, rtol, atol, what):
    """Close where ``expected`` is finite; not finite where ``expected`` is not."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol,
                               err_msg=what)
    assert not np.isfinite(actual[~finite]).any(), \
        f"{what}: finite result where the reference is NaN/Inf"


def peak(values, unit=0.0):
    finite = np.abs(values[np.isfinite(values)])
    return max(float(finite.max()) if finite.size else 0.0, unit, 1e-30)


class Oracle:
    """float64 reference of one case (see the module docstring for the conventions)."""

    def __init__(self, case, x, target, weight, ignore_index):
        dtype = DTYPES[case.dtype]
        self.x = rounded(x, dtype)
        if case.soft:
            self.target = rounded(rounded(target, DTYPES[case.target_dtype]), dtype)
            self.mask = np.ones(case.n_rows, bool)
        else:
            self.target = target
            self.mask = target != ignore_index
        counted_logits = np.where(self.mask[:, None], self.x, 0.0)
        options = dict(weight=weight, ignore_index=ignore_index,
                       label_smoothing=case.label_smoothing, zloss_scale=case.zloss_scale)
        with np.errstate(all="ignore"):
            self.counted = numpy_cross_entropy(counted_logits, self.target,
                                               reduction=case.reduction, **options)
            self.rows = numpy_cross_entropy(counted_logits, self.target, reduction="none",
                                            **options)
            self.raw = numpy_cross_entropy(self.x, self.target, reduction="none", **options)
        finite = np.abs(self.x[np.isfinite(self.x)])
        magnitude = float(finite.max()) if finite.size else 0.0
        # 4 float32 ulps of the largest logit: the resolution of a float32 lse (module docstring).
        self.slack = 4.0 * float(np.spacing(np.float32(magnitude)))
        w_max = 1.0 if weight is None else float(np.max(weight, initial=0.0))
        self.row_slack = self.slack * (1.0 + case.label_smoothing) * max(w_max, 1.0)
        if case.reduction == "sum":
            self.row_slack *= max(int(self.mask.sum()), 1)
        elif case.reduction == "mean" and self.counted["grad_unit"] != 1.0:
            self.row_slack *= int(self.mask.sum()) * self.counted["grad_unit"]


def tolerance(dtype_name):
    return TOLERANCE[DTYPES[dtype_name]]


def check_cross_entropy_loss(case, oracle, xt, tt, wt, ignore_index):
    options = dict(reduction=case.reduction, ignore_index=ignore_index,
                   label_smoothing=case.label_smoothing,
                   lse_square_scale_for_zloss=case.zloss_scale, return_zloss=case.return_zloss)
    loss, log_prob, zloss, lse = cross_entropy_loss(xt, tt, wt, **options)
    with_zloss = case.return_zloss

    def objective(logits):
        out = cross_entropy_loss(logits, tt, wt, **options)
        total = out[0].astype(ms.float32).sum()
        return total + out[2].astype(ms.float32).sum() if with_zloss else total

    grad = ms.grad(objective)(xt)
    dtype = DTYPES[case.dtype]
    rtol, atol = tolerance(case.dtype)
    ref = oracle.counted
    assert loss.dtype == dtype and log_prob.dtype == dtype
    assert_matches(to_numpy(loss), rounded(ref["loss"], dtype), rtol + oracle.slack,
                   atol + oracle.row_slack, "loss")
    assert_matches(to_numpy(log_prob), rounded(oracle.raw["log_prob"], dtype),
                   rtol + oracle.slack, atol + oracle.slack, "log_prob")
    if case.zloss_scale > 0:
        assert_matches(to_numpy(lse), oracle.raw["lse"], tolerance("float32")[0],
                       tolerance("float32")[1] + oracle.slack, "lse_for_zloss")
    else:
        assert lse.shape == (0,)
    expected_grad = ref["grad"]
    if with_zloss:
        assert_matches(to_numpy(zloss), rounded(ref["zloss"], dtype), rtol + oracle.slack, atol,
                       "zloss")
        expected_grad = expected_grad + ref["zgrad"]
    else:
        assert zloss.shape == (0,)
    scale = peak(expected_grad, ref["grad_unit"])
    assert grad.dtype == dtype
    assert_matches(to_numpy(grad), expected_grad, rtol + oracle.slack,
                   (atol + oracle.slack) * scale, "d(loss + zloss)/d input")


LSE_GRAD_COEF = 0.01


def check_cross_entropy_rows(case, oracle, xt, tt, wt, ignore_index, rows_fn=cross_entropy_rows,
                             double_rounding=0.0):
    """``rows_fn``: cross_entropy_rows, or vocab_parallel_cross_entropy_rows in one process (the
    whole vocabulary on one rank), which must give the same per-row values and gradient.

    ``double_rounding``: extra absolute gradient tolerance, in units of the gradient's scale, for
    a path that rounds an intermediate gradient to the input dtype (see check_vocab_parallel_rows).
    """
    loss_rows, lse, row_weight = rows_fn(xt, tt, wt, ignore_index, case.label_smoothing)

    def objective(logits):
        rows, row_lse, _ = rows_fn(logits, tt, wt, ignore_index, case.label_smoothing)
        return rows.sum() + LSE_GRAD_COEF * (row_lse * row_lse).sum()

    grad = ms.grad(objective)(xt)
    rtol32, atol32 = tolerance("float32")
    assert loss_rows.dtype == lse.dtype == row_weight.dtype == ms.float32
    slack = oracle.slack * (1.0 + case.label_smoothing) * max(
        1.0, float(np.max(to_numpy(wt), initial=0.0)) if wt is not None else 1.0)
    assert_matches(loss_rows.asnumpy(), oracle.rows["loss"], rtol32 + oracle.slack,
                   atol32 + slack, "loss_rows")
    assert_matches(lse.asnumpy(), oracle.raw["lse"], rtol32, atol32 + oracle.slack, "lse")
    if case.soft:
        expected_weight = np.ones(case.n_rows)
    else:
        w = np.ones(case.n_classes) if wt is None else to_numpy(wt)
        expected_weight = np.where(oracle.mask, w[np.where(oracle.mask, oracle.target, 0)], 0.0)
    np.testing.assert_array_equal(row_weight.asnumpy(), expected_weight, "row_weight")
    with np.errstate(all="ignore"):
        prob = np.exp(oracle.raw["log_prob"])
        expected_grad = oracle.rows["grad"] + 2 * LSE_GRAD_COEF * oracle.raw["lse"][:, None] * prob
    rtol, atol = tolerance(case.dtype)
    assert grad.dtype == DTYPES[case.dtype]
    # One upstream step is a = 1 per row (times its class weight): the gradient's scale where the
    # expected values are all near 0 (e.g. C = 1, where only the small lse term remains).
    unit = float(np.max(expected_weight, initial=1.0)) if case.n_rows else 1.0
    assert_matches(to_numpy(grad), expected_grad, rtol + oracle.slack,
                   (atol + oracle.slack + double_rounding) * peak(expected_grad, unit),
                   "d rows / d input")


def check_cross_entropy_loss_grad(case, oracle, xt, tt, wt, ignore_index):
    dtype = DTYPES[case.dtype]
    options = dict(reduction=case.reduction, ignore_index=ignore_index,
                   label_smoothing=case.label_smoothing,
                   lse_square_scale_for_zloss=case.zloss_scale)
    _, log_prob, _, lse = cross_entropy_loss(xt, tt, wt, return_zloss=case.zloss_scale > 0,
                                             **options)
    rng = np.random.default_rng(case.seed + 1)
    shape = (case.n_rows,) if case.reduction == "none" else ()
    upstream = rounded(rng.uniform(-2, 2, shape), dtype)
    upstream_z = rounded(rng.uniform(-2, 2, shape), dtype)
    with_zloss = case.zloss_scale > 0
    grad = cross_entropy_loss_grad(to_ms(upstream, dtype), log_prob, tt, wt,
                                   grad_zloss=to_ms(upstream_z, dtype) if with_zloss else None,
                                   lse_for_zloss=lse if with_zloss else None, **options)
    ref = oracle.counted
    as_rows = (lambda g: g[:, None]) if case.reduction == "none" else (lambda g: g)
    expected = as_rows(upstream) * ref["grad"]
    if with_zloss:
        expected = expected + as_rows(upstream_z) * ref["zgrad"]
    rtol, atol = tolerance(case.dtype)
    # p = exp(log_prob) with log_prob rounded to the dtype: relative error |log p| * 2^-(bits+1),
    # which matters where p is large enough to count, |log p| <= ~10.
    stored = 10.0 * 2.0 ** -(MANTISSA_BITS[case.dtype] + 1)
    scale = peak(expected, ref["grad_unit"] * float(np.max(np.abs(upstream), initial=1.0)))
    assert grad.dtype == dtype
    assert_matches(to_numpy(grad), expected, rtol + oracle.slack + stored,
                   (atol + oracle.slack + stored) * scale, "cross_entropy_loss_grad")


def check_vocab_parallel_rows(case, oracle, xt, tt, wt, ignore_index):
    """With label smoothing, the vocab-parallel bprop rounds the backward kernel's output (which
    holds the smoothing part p (eps/C) W of the lse coefficient) to the input dtype, then
    subtracts the rank-1 term (eps/C) a w[c] and rounds again: up to one more ulp of the dtype at
    the kernel output's magnitude, <= (1 + eps) per unit of upstream gradient. That is visible
    only when (eps/C) w[c] is not small, i.e. for a handful of classes (e.g. float16, C = 1,
    eps = 0.999: 4.4e-4 where the single-device path is exact); at C = 1000 or 32000 both paths
    agree to the last bit (reported to the vocab-parallel owner)."""
    extra = 0.0
    if case.label_smoothing > 0 and case.dtype != "float32":
        extra = 2.0 ** -MANTISSA_BITS[case.dtype] * (1.0 + case.label_smoothing)
    check_cross_entropy_rows(case, oracle, xt, tt, wt, ignore_index,
                             vocab_parallel_cross_entropy_rows, extra)


def check_cell(case, oracle, xt, tt, wt, ignore_index):
    """The CrossEntropyLoss Cell (MindFormers drop-in): per row l_n, rho_n = w[y_n] c_n and the
    unweighted z-loss z_n = s c_n lse_n^2 (c_n = 0 if ignored, else 1); "mean" =
    sum(mask l) / (sum(mask rho) + 1e-8) + sum(mask z) / (sum(mask c) + 1e-8), "sum" =
    sum(mask (l + z)) (both shape (1,)), "none" = mask (l + z); float32 in every case."""
    rng = np.random.default_rng(case.seed + 2)
    mask = (rng.random(case.n_rows) < 0.8).astype(np.float32)
    cell = CrossEntropyLoss(weight=None if wt is None else to_numpy(wt), ignore_index=ignore_index,
                            label_smoothing=case.label_smoothing,
                            lse_square_scale_for_zloss=case.zloss_scale, reduction=case.reduction)
    mask_t = ms.Tensor(mask)
    loss = cell(xt, tt, mask_t)

    def objective(logits):
        return cell(logits, tt, mask_t).sum()

    grad = ms.grad(objective)(xt)
    if case.soft:
        counted = np.ones(case.n_rows)
        rho = counted
    else:
        w = np.ones(case.n_classes) if wt is None else to_numpy(wt)
        counted = oracle.mask.astype(np.float64)
        rho = np.where(oracle.mask, w[np.where(oracle.mask, oracle.target, 0)], 0.0)
    s = case.zloss_scale
    denominator = float((rho * mask).sum()) + 1e-8
    z_denominator = float((counted * mask).sum()) + 1e-8
    with np.errstate(all="ignore"):
        lse = np.where(counted * mask > 0, oracle.rows["lse"], 0.0)
        z_rows = s * counted * lse ** 2
        prob = np.exp(oracle.rows["log_prob"])
        z_grads = (2 * s * counted * lse)[:, None] * prob
        if case.reduction == "mean":
            expected = ((oracle.rows["loss"] * mask).sum(keepdims=True) / denominator
                        + (z_rows * mask).sum(keepdims=True) / z_denominator)
            unit = 1.0 / denominator
            row_grads = oracle.rows["grad"] * unit + z_grads / z_denominator
        else:
            contributions = (oracle.rows["loss"] + z_rows) * mask
            expected = contributions if case.reduction == "none" else contributions.sum(
                keepdims=True)
            unit = 1.0
            row_grads = oracle.rows["grad"] + z_grads
    # Masked-out rows get exactly zero gradient, even where their logits are non-finite.
    expected_grad = np.where(mask[:, None] > 0, row_grads, 0.0)
    rtol32, atol32 = tolerance("float32")
    assert loss.dtype == ms.float32
    scale = 1.0 if case.reduction == "none" else max(int(mask.sum()), 1) * unit
    assert_matches(loss.asnumpy(), expected, rtol32 + oracle.slack,
                   atol32 + oracle.slack * (1 + case.label_smoothing) * scale, "Cell loss")
    rtol, atol = tolerance(case.dtype)
    # MindFormers' "mean" divides by sum(mask rho) + 1e-8: with zero weights on every counted row
    # the gradient is ~1e8 x the smoothing term and may overflow float16 legitimately.
    assert_matches(to_numpy(grad), rounded(expected_grad, DTYPES[case.dtype]), rtol + oracle.slack,
                   (atol + oracle.slack) * peak(expected_grad, unit), "Cell d loss / d logits")


CHECKS = {"cross_entropy_loss": check_cross_entropy_loss,
          "CrossEntropyLoss": check_cell,
          "cross_entropy_rows": check_cross_entropy_rows,
          "cross_entropy_loss_grad": check_cross_entropy_loss_grad,
          "vocab_parallel_cross_entropy_rows": check_vocab_parallel_rows}


@FUZZ
@given(case=valid_cases())
def fuzz_valid_cross_entropy(case):
    x, target, weight, ignore_index = case.arrays()
    CASES_RUN["cross_entropy valid"] += 1
    record_coverage(case, x)
    dtype = DTYPES[case.dtype]
    xt = to_ms(x, dtype)
    tt = to_ms(target, DTYPES[case.target_dtype]) if case.soft else ms.Tensor(target)
    wt = None if weight is None else to_ms(weight, DTYPES[case.weight_dtype])
    oracle = Oracle(case, x, target, weight, ignore_index)
    CHECKS[case.api](case, oracle, xt, tt, wt, ignore_index)


def test_fuzz_valid_cross_entropy_calls_match_the_float64_reference():
    run_counted("cross_entropy valid", fuzz_valid_cross_entropy, VALID_EXAMPLES, VALID_COVERAGE)


# ---- bad cross-entropy inputs ------------------------------------------------------------------

# Each entry: (argument named in the error, function (rng, n, c, ignore_index) -> changes).
INT64 = np.iinfo(np.int64)
INT32 = np.iinfo(np.int32)


def _bad_target_value(value_of):
    def change(rng, n, c, ignore_index):
        t = rng.integers(0, c, n)
        t[rng.integers(0, n)] = value_of(rng, c, ignore_index)
        return {"target": ms.Tensor(t.astype(np.int64))}
    return change


def _bad_target_int32(rng, n, c, ignore_index):
    t = rng.integers(0, c, n).astype(np.int32)
    t[rng.integers(0, n)] = rng.choice([INT32.min, INT32.max, c, -2])
    return {"target": ms.Tensor(t)}


def _nonzero_away_from(value, avoid):
    return value if value != avoid else value - 1


BAD_KINDS = {
    "target_at_C": ("target", _bad_target_value(lambda rng, c, ii: c)),
    "target_above_C": ("target", _bad_target_value(
        lambda rng, c, ii: c + int(rng.integers(1, 1000)))),
    "target_negative": ("target", _bad_target_value(
        lambda rng, c, ii: _nonzero_away_from(-int(rng.integers(1, 200)), ii))),
    "target_int64_max": ("target", _bad_target_value(lambda rng, c, ii: INT64.max)),
    "target_int64_min": ("target", _bad_target_value(lambda rng, c, ii: INT64.min)),
    "target_int32_extremes": ("target", _bad_target_int32),
    "target_uint8": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros(n, np.uint8))}),
    "target_int16": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros(n, np.int16))}),
    "target_bool": ("target", lambda rng, n, c, ii: {"target": ms.Tensor(np.zeros(n, bool))}),
    "target_float64_rows": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros(n, np.float64))}),
    "target_rows": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros(n + int(rng.integers(1, 4)), np.int64))}),
    "target_column": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros((n, 1), np.int64))}),
    "target_scalar": ("target", lambda rng, n, c, ii: {"target": ms.Tensor(np.int64(0))}),
    "target_int_matrix": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros((n, c), np.int64))}),
    "probabilities_shape": ("target", lambda rng, n, c, ii: {
        "target": ms.Tensor(np.zeros((n, c + 1), np.float32))}),
    "input_vector": ("input", lambda rng, n, c, ii: {"input": ms.Tensor(np.zeros(c, np.float32))}),
    "input_3d": ("input", lambda rng, n, c, ii: {
        "input": ms.Tensor(np.zeros((n, 1, c), np.float32))}),
    "input_int32": ("input", lambda rng, n, c, ii: {
        "input": ms.Tensor(np.zeros((n, c), np.int32))}),
    "input_float64": ("input", lambda rng, n, c, ii: {
        "input": ms.Tensor(np.zeros((n, c), np.float64))}),
    "input_no_classes": ("input", lambda rng, n, c, ii: {
        "input": ms.Tensor(np.zeros((n, 0), np.float32))}),
    "weight_length": ("weight", lambda rng, n, c, ii: {
        "weight": ms.Tensor(np.ones(c + int(rng.choice([-1, 1, 5])), np.float32))}),
    "weight_2d": ("weight", lambda rng, n, c, ii: {
        "weight": ms.Tensor(np.ones((1, c), np.float32))}),
    "weight_not_finite": ("weight", lambda rng, n, c, ii: {
        "weight": ms.Tensor(np.where(np.arange(c) == rng.integers(0, c),
                                     rng.choice([np.inf, -np.inf, np.nan]), 1.0)
                            .astype(np.float32))}),
    "weight_int": ("weight", lambda rng, n, c, ii: {
        "weight": ms.Tensor(np.ones(c, np.int32))}),
    "reduction": ("reduction", lambda rng, n, c, ii: {
        "reduction": rng.choice(["avg", "", "MEAN", "elementwise_mean", None, 1])}),
    "label_smoothing": ("label_smoothing", lambda rng, n, c, ii: {
        "label_smoothing": rng.choice([1.0, -0.1, 1.5, float("nan"), float("inf"), True, None])}),
    "zloss_scale": ("lse_square_scale_for_zloss", lambda rng, n, c, ii: {
        "lse_square_scale_for_zloss": rng.choice([1.0, -1e-3, float("nan"), True, None])}),
    "ignore_index": ("ignore_index", lambda rng, n, c, ii: {
        "ignore_index": rng.choice([1.5, True, "x", None, 2 ** 63, -2 ** 63 - 1])}),
}
BAD_APIS = ("cross_entropy_loss", "cross_entropy_rows", "cross_entropy_loss_grad",
            "vocab_parallel_cross_entropy_rows")
ROWS_ARGUMENTS = ("input", "target", "weight", "label_smoothing", "ignore_index")
ROWS_APIS = ("cross_entropy_rows", "vocab_parallel_cross_entropy_rows")
# Layout arguments of vocab_parallel_cross_entropy_rows (one process: the whole vocabulary).
VOCAB_KINDS = {
    "vocab_start_negative": ("vocab_start", {"vocab_start": -1}),
    "vocab_start_past_the_end": ("vocab_start", {"vocab_start": 1}),
    "vocab_start_float": ("vocab_start", {"vocab_start": 0.0}),
    "num_classes_too_small": ("num_classes", {"num_classes": 0}),
    "num_classes_bool": ("num_classes", {"num_classes": True}),
}


BAD_PAIRS = [(api, kind) for kind, (argument, _) in BAD_KINDS.items() for api in BAD_APIS
             if api not in ROWS_APIS or argument in ROWS_ARGUMENTS] + [
                 ("vocab_parallel_cross_entropy_rows", kind) for kind in VOCAB_KINDS]


def bad_cases(api, kind):
    """Valid small calls of ``api`` (shapes, dtype, ignore_index, seed), before ``kind`` is
    applied."""
    return st.fixed_dictionaries({
        "api": st.just(api), "kind": st.just(kind), "n_rows": st.integers(1, 9),
        "n_classes": st.integers(1, 20), "dtype": st.sampled_from(list(DTYPES)),
        "ignore_index": st.sampled_from([-100, -1, 0]), "seed": st.integers(0, 2 ** 32 - 1)})


def call_with(api, arguments):
    args = dict(arguments)
    if api == "cross_entropy_loss":
        return cross_entropy_loss(**args)[0].asnumpy()
    if api in ROWS_APIS:
        for name in ("reduction", "lse_square_scale_for_zloss"):
            args.pop(name)
        rows_fn = cross_entropy_rows if api == "cross_entropy_rows" else \
            vocab_parallel_cross_entropy_rows
        return rows_fn(args.pop("input"), **args)[0].asnumpy()
    log_prob = args.pop("input")
    n_rows = log_prob.shape[0] if len(log_prob.shape) else 0
    shape = (n_rows,) if args.get("reduction") == "none" else ()
    grad_loss = ms.Tensor(np.ones(shape, np.float32))
    return cross_entropy_loss_grad(grad_loss, log_prob, **args).asnumpy()


def check_bad_case(case):
    CASES_RUN["cross_entropy bad input"] += 1
    rng = np.random.default_rng(case["seed"])
    n, c, ii = case["n_rows"], case["n_classes"], case["ignore_index"]
    dtype = DTYPES[case["dtype"]]
    arguments = {"input": to_ms(rng.standard_normal((n, c)), dtype),
                 "target": ms.Tensor(rng.integers(0, c, n)), "weight": None,
                 "reduction": "mean", "ignore_index": ii, "label_smoothing": 0.1,
                 "lse_square_scale_for_zloss": 0.01}
    if case["kind"] in VOCAB_KINDS:
        argument, changes = VOCAB_KINDS[case["kind"]]
        arguments.update(changes)
        arguments.setdefault("num_classes", c)  # vocab_start 1: [1, 1 + C) is not in [0, C)
    else:
        argument, change = BAD_KINDS[case["kind"]]
        arguments.update(change(rng, n, c, ii))
    with pytest.raises((TypeError, ValueError)) as error:
        call_with(case["api"], arguments)
    if argument == "input" and case["api"] == "cross_entropy_loss_grad":
        argument = "log_prob"
    # The layout errors name the argument in a formula ("[vocab_start, ...) ... num_classes").
    named = f"`{argument}`" if case["kind"] not in VOCAB_KINDS else argument
    assert named in str(error.value), (case, str(error.value))
    assert case["api"] in str(error.value), (case, str(error.value))


@pytest.mark.parametrize("api,kind", BAD_PAIRS, ids=[f"{api}-{kind}" for api, kind in BAD_PAIRS])
def test_fuzz_bad_cross_entropy_inputs_raise_errors_naming_the_argument(api, kind):
    before = CASES_RUN["cross_entropy bad input"]
    fuzz = settings(FUZZ, max_examples=BAD_EXAMPLES_PER_PAIR)(
        given(case=bad_cases(api, kind))(check_bad_case))
    fuzz()
    assert CASES_RUN["cross_entropy bad input"] - before >= BAD_EXAMPLES_PER_PAIR


# ---- binary cross-entropy with logits ----------------------------------------------------------

BCE_SHAPE_KINDS = ("scalar", "vector", "matrix", "rank4", "zero_size", "parallel")
BCE_LOGIT_KINDS = ("normal", "minus_120", "infinities", "nan", "huge", "tiny")
BCE_REDUCTIONS = ("none", "mean", "sum", 0, 1, 2)
BCE_REDUCTION_NAMES = {0: "none", 1: "mean", 2: "sum", "none": "none", "mean": "mean",
                       "sum": "sum"}
# The summing BCE kernel adds a chunk of at most 8192 non-negative terms in float32, one partial
# per SIMD lane (>= 4 lanes on any x86-64 build: <= 2048 terms each), then chunks in float64:
# relative error <= 2048 * 2^-24 (a sum of n non-negative float32 terms is within n * 2^-24).
BCE_SUM_RTOL = 2048 * 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class BceCase:
    dtype: str
    target_dtype: str
    shape: tuple
    logits: str
    weight_shape: object  # None (absent) or a shape that broadcasts to `shape`
    pos_weight_shape: object
    factor_dtype: str
    reduction: object
    seed: int

    def arrays(self):
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal(self.shape) * 4
        picks = rng.random(self.shape)
        special = {"minus_120": [-120.0, 120.0], "infinities": [np.inf, -np.inf],
                   "nan": [np.nan], "huge": [6e4, -6e4], "tiny": [1e-30, -1e-30]}
        if self.logits in special:
            x = np.where(picks < 0.3, rng.choice(special[self.logits], self.shape), x)
        t = rng.random(self.shape)
        t = np.where(rng.random(self.shape) < 0.3, np.round(t), t)
        w = None if self.weight_shape is None else rng.random(self.weight_shape) * 2
        pw = None if self.pos_weight_shape is None else rng.choice([0.0, 0.5, 1.0, 3.0, 40.0],
                                                                   self.pos_weight_shape)
        return x, t, w, pw


def broadcastable(draw, shape):
    """None, or a shape broadcasting to ``shape``: leading dims dropped, others kept or 1."""
    if draw(st.booleans()):
        return None
    keep = draw(st.integers(0, len(shape)))
    return tuple(d if draw(st.booleans()) else 1 for d in shape[len(shape) - keep:])


@st.composite
def bce_cases(draw):
    kind = draw(st.sampled_from(BCE_SHAPE_KINDS))
    dims = st.integers(1, 9)
    shape = {"scalar": (), "vector": (draw(st.integers(1, 70)),),
             "matrix": (draw(dims), draw(st.integers(1, 40))),
             "rank4": tuple(draw(dims) for _ in range(4)),
             "zero_size": (draw(dims), 0, draw(dims)),
             "parallel": (draw(st.integers(33, 70)), draw(st.integers(1000, 1100)))}[kind]
    return BceCase(dtype=draw(st.sampled_from(list(DTYPES))),
                   target_dtype=draw(st.sampled_from(list(DTYPES))), shape=shape,
                   logits=draw(st.sampled_from(BCE_LOGIT_KINDS)),
                   weight_shape=broadcastable(draw, shape),
                   pos_weight_shape=broadcastable(draw, shape),
                   factor_dtype=draw(st.sampled_from(list(DTYPES))),
                   reduction=draw(st.sampled_from(BCE_REDUCTIONS)),
                   seed=draw(st.integers(0, 2 ** 32 - 1)))


BCE_COVERAGE = {"shape": set(BCE_SHAPE_KINDS), "logits": set(BCE_LOGIT_KINDS),
                "reduction": {str(r) for r in BCE_REDUCTIONS}, "dtype": set(DTYPES),
                "factors": {"weight", "pos_weight"}}


@settings(FUZZ, max_examples=BCE_EXAMPLES)
@given(case=bce_cases())
def fuzz_valid_bce(case):
    CASES_RUN["bce valid"] += 1
    shape_kind = ("scalar" if case.shape == () else "zero_size" if 0 in case.shape
                  else "parallel" if int(np.prod(case.shape)) > 32768 else "other")
    COVERAGE["shape"].add(shape_kind if shape_kind != "other" else
                          {1: "vector", 2: "matrix", 4: "rank4"}[len(case.shape)])
    COVERAGE["logits"].add(case.logits)
    COVERAGE["reduction"].add(str(case.reduction))
    COVERAGE["dtype"].add(case.dtype)
    for name, value in (("weight", case.weight_shape), ("pos_weight", case.pos_weight_shape)):
        if value is not None:
            COVERAGE["factors"].add(name)
    x, t, w, pw = case.arrays()
    dtype = DTYPES[case.dtype]
    factor_dtype = DTYPES[case.factor_dtype]
    xt = to_ms(x, dtype)
    tt = to_ms(t, DTYPES[case.target_dtype])
    wt = None if w is None else to_ms(w, factor_dtype)
    pwt = None if pw is None else to_ms(pw, factor_dtype)
    reduction = BCE_REDUCTION_NAMES[case.reduction]

    def objective(logits, target):
        return binary_cross_entropy_with_logits(logits, target, wt, pwt,
                                                case.reduction).astype(ms.float32).sum()

    loss = binary_cross_entropy_with_logits(xt, tt, wt, pwt, case.reduction)
    grad_x, grad_t = ms.grad(objective, grad_position=(0, 1))(xt, tt)
    x_read = rounded(x, dtype)
    t_read = rounded(rounded(t, DTYPES[case.target_dtype]), dtype)
    with np.errstate(all="ignore"):
        ref_loss, ref_grad_x, ref_grad_t = torch_bce_with_logits(
            x_read, t_read, None if w is None else rounded(w, factor_dtype),
            None if pw is None else rounded(pw, factor_dtype), reduction)
    rtol, atol = tolerance(case.dtype)
    assert loss.dtype == dtype
    assert loss.shape == (case.shape if reduction == "none" else ())
    loss_rtol = rtol + (BCE_SUM_RTOL if reduction != "none" else 0.0)
    assert_matches(to_numpy(loss), rounded(ref_loss, dtype), loss_rtol, atol, "loss")
    # The target is read in the input dtype; its gradient is rounded to that dtype and then to
    # the target's own dtype: the coarser of the two tolerances applies.
    # Rounding to those dtypes may overflow (|x| = 6e4 makes |d/d target| ~ 1e5 > float16 max).
    coarser = max((case.dtype, case.target_dtype), key=lambda name: tolerance(name)[0])
    grad_t_dtype = DTYPES[case.target_dtype]
    for what, actual, expected, (g_rtol, g_atol) in (
            ("d/d input", grad_x, rounded(ref_grad_x, dtype), (rtol, atol)),
            ("d/d target", grad_t, rounded(rounded(ref_grad_t, dtype), grad_t_dtype),
             tolerance(coarser))):
        scale = peak(np.asarray(expected))
        assert_matches(to_numpy(actual), expected, g_rtol, g_atol * scale, what)


def test_fuzz_valid_bce_calls_match_the_float64_reference():
    run_counted("bce valid", fuzz_valid_bce, BCE_EXAMPLES, BCE_COVERAGE)


BCE_BAD_KINDS = {
    "target_shape": ("target", lambda rng, shape: {"target": ms.Tensor(np.zeros(shape + (2,),
                                                                               np.float32))}),
    "target_int": ("target", lambda rng, shape: {"target": ms.Tensor(np.zeros(shape, np.int64))}),
    "input_int": ("input", lambda rng, shape: {"input": ms.Tensor(np.zeros(shape, np.int32))}),
    "input_float64": ("input", lambda rng, shape: {"input": ms.Tensor(np.zeros(shape,
                                                                              np.float64))}),
    "weight_shape": ("weight", lambda rng, shape: {
        "weight": ms.Tensor(np.ones(shape[-1:] + (3,), np.float32))}),
    "weight_negative": ("weight", lambda rng, shape: {
        "weight": ms.Tensor(np.full(shape[-1:], -0.5, np.float32))}),
    "weight_int": ("weight", lambda rng, shape: {"weight": ms.Tensor(np.ones(shape, np.int32))}),
    "weight_list": ("weight", lambda rng, shape: {"weight": [1.0] * shape[-1]}),
    "pos_weight_shape": ("pos_weight", lambda rng, shape: {
        "pos_weight": ms.Tensor(np.ones((shape[-1] + 1,), np.float32))}),
    "pos_weight_negative": ("pos_weight", lambda rng, shape: {
        "pos_weight": ms.Tensor(np.full(shape, -1.0, np.float32))}),
    "reduction": ("reduction", lambda rng, shape: {
        "reduction": rng.choice(["avg", "", 3, -1, True, None])}),
}


def bce_bad_cases(kind):
    return st.fixed_dictionaries({
        "kind": st.just(kind), "shape": st.lists(st.integers(1, 6), min_size=1, max_size=3),
        "dtype": st.sampled_from(list(DTYPES)), "seed": st.integers(0, 2 ** 32 - 1)})


def check_bad_bce_case(case):
    CASES_RUN["bce bad input"] += 1
    rng = np.random.default_rng(case["seed"])
    shape = tuple(case["shape"])
    dtype = DTYPES[case["dtype"]]
    arguments = {"input": to_ms(rng.standard_normal(shape), dtype),
                 "target": to_ms(rng.random(shape), dtype), "weight": None, "pos_weight": None,
                 "reduction": "mean"}
    argument, change = BCE_BAD_KINDS[case["kind"]]
    arguments.update(change(rng, shape))
    with pytest.raises((TypeError, ValueError)) as error:
        binary_cross_entropy_with_logits(**arguments).asnumpy()
    assert f"`{argument}`" in str(error.value), (case, str(error.value))
    assert "binary_cross_entropy_with_logits" in str(error.value), (case, str(error.value))


@pytest.mark.parametrize("kind", list(BCE_BAD_KINDS))
def test_fuzz_bad_bce_inputs_raise_errors_naming_the_argument(kind):
    before = CASES_RUN["bce bad input"]
    fuzz = settings(FUZZ, max_examples=BAD_EXAMPLES_PER_PAIR * 2)(
        given(case=bce_bad_cases(kind))(check_bad_bce_case))
    fuzz()
    assert CASES_RUN["bce bad input"] - before >= BAD_EXAMPLES_PER_PAIR * 2


# ---- linear cross-entropy (logits never materialised) ------------------------------------------

LINEAR_EXAMPLES = 50
LINEAR_REDUCTIONS = ("mean", "sum", "none", "per_token")
# As tests/test_linear_cross_entropy.py: with a softcap the derivative 1 - tanh^2 is taken from the
# float32 capped logits, so near +-cap the rounding of tanh is amplified (observed 1.5e-5 of the
# gradient's peak in float32): the gradient tolerance of softcapped cases is 10x wider.
SOFTCAP_GRAD_SCALE = 10.0


@st.composite
def linear_cases(draw):
    # N = 0 is left out until linear_cross_entropy stops using Tensor.sum() on [N] vectors: an
    # empty ReduceSum returns garbage on MindSpore 2.9 CPU (found here: "sum" returned 1.0, "mean"
    # is wrong in ~3 of 10 calls; reported to its owner). Add 0 back to the choices below then.
    n_rows = draw(st.sampled_from([1, draw(st.integers(2, 16))]))
    n_vocab = draw(st.one_of(st.integers(1, 70), st.sampled_from([2047, 2049])))
    return {
        "dtype": draw(st.sampled_from(list(DTYPES))), "n_rows": n_rows,
        "n_hidden": draw(st.integers(1, 40)), "n_vocab": n_vocab,
        "chunk_size": draw(st.sampled_from([None, 2, 5, 64])),
        "bias": draw(st.booleans()), "class_weight": draw(st.sampled_from(WEIGHT_KINDS)),
        "ignore": draw(st.sampled_from(["default", "minus_one", "valid_class"])),
        "ignore_fraction": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "target_dtype": draw(st.sampled_from(["int32", "int64"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.6])),
        "zloss_scale": draw(st.sampled_from([0.0, 0.05])),
        "logit_softcap": draw(st.sampled_from([0.0, 4.0, 30.0])),
        "logit_scale": draw(st.sampled_from([1.0, 0.5, -1.3])),
        "reduction": draw(st.sampled_from(LINEAR_REDUCTIONS)),
        "mask": draw(st.sampled_from(["none", "float", "bool"])),
        "seed": draw(st.integers(0, 2 ** 32 - 1))}


LINEAR_COVERAGE = {"rows": {"N=1", "N>1"}, "reduction": set(LINEAR_REDUCTIONS),
                   "dtype": set(DTYPES), "softcap": {"on", "off"}, "chunks": {"several", "one"}}


@settings(FUZZ, max_examples=LINEAR_EXAMPLES)
@given(case=linear_cases())
def fuzz_valid_linear_cross_entropy(case):
    CASES_RUN["linear_cross_entropy valid"] += 1
    n, h, v = case["n_rows"], case["n_hidden"], case["n_vocab"]
    COVERAGE["rows"].add("N=0" if n == 0 else "N=1" if n == 1 else "N>1")
    COVERAGE["reduction"].add(case["reduction"])
    COVERAGE["dtype"].add(case["dtype"])
    COVERAGE["softcap"].add("on" if case["logit_softcap"] > 0 else "off")
    COVERAGE["chunks"].add("several" if case["chunk_size"] and case["chunk_size"] < n else "one")
    rng = np.random.default_rng(case["seed"])
    dtype = DTYPES[case["dtype"]]
    hidden = rounded(rng.standard_normal((n, h)), dtype)
    weight = rounded(rng.standard_normal((v, h)) * 2 / np.sqrt(h), dtype)
    bias = rounded(rng.standard_normal(v), dtype) if case["bias"] else None
    ignore_index = {"default": -100, "minus_one": -1,
                    "valid_class": int(rng.integers(0, v))}[case["ignore"]]
    target = rng.integers(0, v, n)
    target[rng.random(n) < case["ignore_fraction"]] = ignore_index
    class_weight = None
    if case["class_weight"] != "none":
        class_weight = (rng.random(v) + 0.25).astype(np.float32)
        if case["class_weight"] == "with_zeros":
            class_weight[rng.random(v) < 0.3] = 0.0
        elif case["class_weight"] == "all_zero":
            class_weight[:] = 0.0
    mask = None if case["mask"] == "none" else (rng.random(n) < 0.7).astype(np.float32)
    per_token = case["reduction"] == "per_token"
    options = dict(ignore_index=ignore_index, label_smoothing=case["label_smoothing"],
                   lse_square_scale_for_zloss=case["zloss_scale"],
                   logit_softcap=case["logit_softcap"], logit_scale=case["logit_scale"],
                   reduction="mean" if per_token else case["reduction"],
                   return_per_token=per_token, chunk_size=case["chunk_size"])
    target_t = ms.Tensor(target.astype(case["target_dtype"]))
    weight_t = None if class_weight is None else ms.Tensor(class_weight)
    mask_t = None if mask is None else (ms.Tensor(mask > 0) if case["mask"] == "bool"
                                        else ms.Tensor(mask))

    def call(hidden_t, lm_weight, bias_t):
        return linear_cross_entropy(hidden_t, lm_weight, target_t, bias_t, class_weight=weight_t,
                                    input_mask=mask_t, **options)

    def objective(hidden_t, lm_weight, bias_t):
        out = call(hidden_t, lm_weight, bias_t)
        return (out[0] if per_token else out).sum()

    args = (to_ms(hidden, dtype), to_ms(weight, dtype),
            to_ms(bias if bias is not None else np.zeros(v), dtype))
    loss = call(*args)
    grads = ms.grad(objective, grad_position=(0, 1, 2))(*args)
    ref_loss, ref_grads = torch_linear_cross_entropy(
        hidden, weight, target, bias, class_weight, mask, ignore_index, case["label_smoothing"],
        case["zloss_scale"], case["logit_softcap"], case["logit_scale"], case["reduction"])
    rtol, atol = tolerance(case["dtype"])
    if per_token:
        assert_matches(to_numpy(loss[0]), ref_loss[0], rtol, atol, "numerator")
        assert_matches(to_numpy(loss[1]), ref_loss[1], rtol, atol, "denominator")
    else:
        assert loss.dtype == ms.float32
        assert_matches(to_numpy(loss), ref_loss, rtol, atol, "loss")
    widen = SOFTCAP_GRAD_SCALE if case["logit_softcap"] > 0 else 1.0
    for name, grad in zip(("hidden", "weight", "bias"), grads):
        expected = ref_grads[name]
        assert grad.shape == expected.shape, name
        assert_matches(to_numpy(grad), rounded(expected, dtype), rtol,
                       atol * widen * peak(expected), f"d loss / d {name}")


def test_fuzz_valid_linear_cross_entropy_calls_match_the_float64_reference():
    run_counted("linear_cross_entropy valid", fuzz_valid_linear_cross_entropy, LINEAR_EXAMPLES,
                LINEAR_COVERAGE)
