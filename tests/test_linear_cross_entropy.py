"""The fused linear + cross-entropy: ms_xent.ops.linear_cross_entropy and the
LinearCrossEntropyLoss Cell against a float64 PyTorch oracle (loss and gradients w.r.t. hidden,
weight and bias) and against the unfused path (matmul + ms_xent CrossEntropyLoss), for every
option, chunk sizes that do not divide N, V prime, N = 1, float32, bfloat16 and float16, PYNATIVE
and GRAPH mode, on each backend (``backend`` fixture) and implementation (``linear_backend``): the
CPU kernel over oneDNN (vocabulary blocks) and the chunked MatMul path over the CPU kernels or the
composed backend's per-row cross-entropy (what other devices run)."""

import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

import ms_xent
from ms_xent._backends import dispatch as backends
from ms_xent._backends import linear_chunks
from ms_xent._backends._mindspore import total as sum_rows
from ms_xent._backends.cpu import linear_cross_entropy_op as cpu_linear
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.nn.linear_cross_entropy_loss import LinearCrossEntropyLoss
from ms_xent.ops.linear_cross_entropy import (MAX_BLOCK_BYTES, MAX_BLOCK_WORKSPACE,
                                              MAX_WORKSPACE, MIN_BLOCK_WORKSPACE, MIN_CHUNK_ROWS,
                                              MIN_ROW_BLOCK, MIN_WORKSPACE, ROW_BLOCK_FRACTION,
                                              chunk_layout, linear_cross_entropy,
                                              row_block_layout)
from tests.conftest import BACKENDS
from tests.reference import (DTYPES, TOLERANCE, assert_close, assert_close_to_peak, rounded,
                             to_ms, to_numpy, torch_linear_cross_entropy)

IGNORE_INDEX = -100
# N rows (not a multiple of CHUNK), H hidden, V vocabulary (prime). With these sizes the PYNATIVE
# weight-gradient accumulation is split into vocabulary blocks (4 blocks of 8 rows and 1 of 5).
N, H, V, CHUNK = 13, 8, 37, 4
UPSTREAM = 2.5  # a non-unit upstream gradient exercises the scaling of the stored gradients
# The softcap's derivative 1 - tanh^2 is taken from the float32 capped logits (as autodiff of
# tanh does): near +-cap the rounding of tanh (6e-8) is amplified in 1 - tanh^2, which widens the
# gradient tolerance of softcapped cases in float32 (observed up to 1.5e-5 of the peak).
SOFTCAP_GRAD_SCALE = 10.0


# Each implementation of the fused linear + cross-entropy on each test backend: on cpu the oneDNN
# kernel ("kernel") and the row chunks over the CPU kernels, as without oneDNN ("chunks"); the
# other backends have the row chunks only.
IMPLEMENTATIONS = [(backend, implementation) for backend in BACKENDS
                   for implementation in (("kernel", "chunks") if backend == backends.CPU_KERNEL
                                          else ("chunks",))]
each_implementation = pytest.mark.parametrize(
    ("backend", "linear_backend"), IMPLEMENTATIONS, indirect=True,
    ids=[f"{backend}-{implementation}" for backend, implementation in IMPLEMENTATIONS])


@pytest.fixture(name="linear_backend")
def linear_backend_fixture(request, backend, monkeypatch):
    """The implementation (``each_implementation``) on the backend, as the dispatch names it."""
    if request.param == "chunks" and backend == backends.CPU_KERNEL:
        monkeypatch.setattr(cpu_linear, "onednn_library", lambda: None)
    return backends.MATMUL_CHUNKS if request.param == "chunks" else backends.CPU_KERNEL


def make_data(n_rows=N, seed=0, ignore_fraction=0.0, mask=False, bias=False,
              class_weight=False):
    """float32 numpy inputs; the logits hidden @ weight.T have a standard deviation of about 3."""
    rng = np.random.default_rng(seed)
    data = {
        "hidden": rng.standard_normal((n_rows, H)).astype(np.float32),
        "weight": (rng.standard_normal((V, H)) * 3 / np.sqrt(H)).astype(np.float32),
        "target": rng.integers(0, V, n_rows).astype(np.int64),
        "bias": rng.standard_normal(V).astype(np.float32) if bias else None,
        "class_weight": (rng.random(V) + 0.25).astype(np.float32) if class_weight else None,
        "mask": None,
    }
    data["target"][rng.random(n_rows) < ignore_fraction] = IGNORE_INDEX
    if mask:
        values = rng.random(n_rows).astype(np.float32) + 0.5
        values[rng.random(n_rows) < 0.3] = 0.0
        data["mask"] = values
    return data


class LossCell(nn.Cell):
    """linear_cross_entropy's output (``raw``) or sum(upstream * loss), the numerator only for
    per-token outputs (compiled in GRAPH mode)."""

    def __init__(self, target, class_weight, mask, upstream, options, raw=False):
        super().__init__()
        self.target = target
        self.class_weight = class_weight
        self.mask = mask
        self.upstream = upstream
        self.options = options
        self.raw = raw

    def construct(self, hidden, weight, bias):
        out = linear_cross_entropy(hidden, weight, self.target, bias=bias,
                                   class_weight=self.class_weight, input_mask=self.mask,
                                   **self.options)
        if self.raw:
            return out
        if self.options.get("return_per_token", False):
            return out[0] * self.upstream
        return (out * self.upstream).sum()


def run_fused(data, options, dtype, upstream):
    """(loss as returned by a plain call, sum(upstream * loss) as seen by autodiff,
    {"hidden", "weight", "bias"} gradients), float64 numpy."""
    tensors = [None if data[name] is None else to_ms(data[name], dtype)
               for name in ("hidden", "weight", "bias")]
    arguments = (ms.Tensor(data["target"]),
                 None if data["class_weight"] is None else ms.Tensor(data["class_weight"]),
                 None if data["mask"] is None else ms.Tensor(data["mask"]),
                 ms.Tensor(np.asarray(upstream, np.float32)), options)
    positions = (0, 1, 2) if tensors[2] is not None else (0, 1)
    weighted, grads = ms.value_and_grad(LossCell(*arguments), grad_position=positions)(*tensors)
    for grad, tensor in zip(grads, tensors):
        assert grad.dtype == dtype and grad.shape == tensor.shape
    loss = LossCell(*arguments, raw=True)(*tensors)
    if isinstance(loss, tuple):
        loss = tuple(to_numpy(part) for part in loss)
    else:
        assert loss.dtype == ms.float32
        loss = to_numpy(loss)
    return loss, to_numpy(weighted), dict(zip(("hidden", "weight", "bias"),
                                             (to_numpy(g) for g in grads)))


def oracle(data, options, dtype, upstream):
    """The float64 PyTorch reference on the inputs rounded to ``dtype``."""
    reduction = options.get("reduction", "mean")
    if options.get("return_per_token", False):
        reduction = "per_token"
    return torch_linear_cross_entropy(
        rounded(data["hidden"], dtype), rounded(data["weight"], dtype), data["target"],
        bias=None if data["bias"] is None else rounded(data["bias"], dtype),
        class_weight=data["class_weight"], mask=data["mask"], ignore_index=IGNORE_INDEX,
        label_smoothing=options.get("label_smoothing", 0.0),
        zloss_scale=options.get("lse_square_scale_for_zloss", 0.0),
        softcap=options.get("logit_softcap", 0.0), scale=options.get("logit_scale", 1.0),
        reduction=reduction, upstream=upstream)


def check_against_oracle(data, options, dtype_name="float32", upstream=UPSTREAM):
    dtype = DTYPES[dtype_name]
    loss, weighted, grads = run_fused(data, options, dtype, upstream)
    expected_loss, expected_grads = oracle(data, options, dtype, upstream)
    if isinstance(expected_loss, tuple):
        assert_close(loss[0], expected_loss[0], dtype, "numerator")
        assert_close(loss[1], expected_loss[1], dtype, "denominator")
        expected_loss = expected_loss[0]
    else:
        assert_close(loss, expected_loss, dtype, "loss")
    assert_close(weighted, (np.asarray(upstream) * expected_loss).sum(), dtype, "under autodiff")
    widen = SOFTCAP_GRAD_SCALE if options.get("logit_softcap", 0.0) > 0 else 1.0
    rtol, atol = TOLERANCE[dtype]
    for name, grad in grads.items():
        peak = np.abs(expected_grads[name]).max()
        assert peak > 0, name
        np.testing.assert_allclose(grad, expected_grads[name], rtol=rtol,
                                   atol=atol * widen * peak, err_msg=f"d loss / d {name}")


ALL_OPTIONS = {"label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.02, "logit_softcap": 4.0,
               "logit_scale": 1.3}
ALL_DATA = {"ignore_fraction": 0.3, "mask": True, "bias": True, "class_weight": True}
CASES = {  # name: (options, make_data keywords)
    "mean": ({}, {}),
    "ignore-index-and-class-weight": ({}, {"ignore_fraction": 0.3, "class_weight": True}),
    "label-smoothing": ({"label_smoothing": 0.2}, {}),
    "zloss": ({"lse_square_scale_for_zloss": 0.05}, {"ignore_fraction": 0.3}),
    "softcap": ({"logit_softcap": 3.0}, {}),
    "scale": ({"logit_scale": 0.6}, {}),
    "bias": ({}, {"bias": True}),
    "input-mask": ({}, {"mask": True}),
    "sum": ({"reduction": "sum"}, {"ignore_fraction": 0.3}),
    "none": ({"reduction": "none"}, ALL_DATA),
    "per-token": ({"return_per_token": True}, ALL_DATA),
    "everything-mean": (ALL_OPTIONS, ALL_DATA),
    "everything-none": (dict(ALL_OPTIONS, reduction="none"), ALL_DATA),
    "everything-sum": (dict(ALL_OPTIONS, reduction="sum"), ALL_DATA),
}


def upstream_for(options, n_rows=N, seed=5):
    if options.get("reduction") == "none":
        return np.random.default_rng(seed).uniform(0.5, 2.0, n_rows).astype(np.float32)
    return UPSTREAM


@each_implementation
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_options_vs_torch(linear_backend, mode, case):
    options, data_options = case
    data = make_data(**data_options)
    check_against_oracle(data, dict(options, chunk_size=CHUNK), upstream=upstream_for(options))


@each_implementation
@pytest.mark.parametrize("options", [dict(ALL_OPTIONS), dict(ALL_OPTIONS, reduction="none")],
                         ids=["mean", "none"])
def test_bfloat16_vs_torch(linear_backend, mode, options):
    check_against_oracle(make_data(**ALL_DATA), dict(options, chunk_size=CHUNK), "bfloat16",
                         upstream_for(options))


@each_implementation
@pytest.mark.parametrize("options", [dict(ALL_OPTIONS), dict(ALL_OPTIONS, reduction="none")],
                         ids=["mean", "none"])
def test_float16_vs_torch(linear_backend, options):
    check_against_oracle(make_data(**ALL_DATA), dict(options, chunk_size=CHUNK), "float16",
                         upstream_for(options))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk_size", [None, 7, 40])
def test_cpu_kernel_blocks_on_a_larger_problem(mode, dtype_name, chunk_size):
    """N = 300, H = 64, V = 3001 on the CPU kernel: several OpenMP slices per product and
    row blocks of 7, 40 and the automatic size (all rows), the last block shorter."""
    rng = np.random.default_rng(11)
    n_rows, n_hidden, n_vocab = 300, 64, 3001
    data = {"hidden": rng.standard_normal((n_rows, n_hidden)).astype(np.float32),
            "weight": (rng.standard_normal((n_vocab, n_hidden)) * 3 / np.sqrt(n_hidden)
                       ).astype(np.float32),
            "target": rng.integers(0, n_vocab, n_rows).astype(np.int64),
            "bias": rng.standard_normal(n_vocab).astype(np.float32),
            "class_weight": (rng.random(n_vocab) + 0.25).astype(np.float32),
            "mask": (rng.random(n_rows) > 0.2).astype(np.float32)}
    data["target"][rng.random(n_rows) < 0.2] = IGNORE_INDEX
    check_against_oracle(data, dict(ALL_OPTIONS, chunk_size=chunk_size), dtype_name)


@each_implementation
@pytest.mark.parametrize("chunk_size", [None, 1, 5, N, 100])
def test_chunk_sizes_agree(linear_backend, chunk_size):
    """Automatic (one chunk here), one row per chunk, non-dividing, exact and oversized chunks."""
    check_against_oracle(make_data(**ALL_DATA), dict(ALL_OPTIONS, chunk_size=chunk_size))


@each_implementation
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_row(linear_backend, mode, reduction):
    options = dict(ALL_OPTIONS, reduction=reduction, chunk_size=CHUNK)
    data = make_data(n_rows=1, bias=True, class_weight=True)
    check_against_oracle(data, options, upstream=upstream_for(options, n_rows=1))


@each_implementation
def test_every_row_ignored_gives_zero_loss_and_gradient(linear_backend, mode):
    data = make_data(bias=True)
    data["target"][:] = IGNORE_INDEX
    loss, weighted, grads = run_fused(data, dict(ALL_OPTIONS, chunk_size=CHUNK), ms.float32,
                                      UPSTREAM)
    assert float(loss) == 0.0 and float(weighted) == 0.0
    for name, grad in grads.items():
        assert not grad.any(), name


@each_implementation
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_gives_empty_or_zero_results(linear_backend, mode, reduction):
    hidden = ms.Tensor(np.zeros((0, H), np.float32))
    weight = to_ms(make_data()["weight"])
    target = ms.Tensor(np.zeros((0,), np.int64))

    def loss(h, w):
        # sum_rows: MindSpore's own sum of an empty tensor is uninitialised memory
        return sum_rows(linear_cross_entropy(h, w, target, reduction=reduction).reshape(-1))

    value, (grad_hidden, grad_weight) = ms.value_and_grad(loss, grad_position=(0, 1))(hidden,
                                                                                     weight)
    assert float(value) == 0.0 and grad_hidden.shape == (0, H)
    assert grad_weight.shape == (V, H) and not to_numpy(grad_weight).any()


@each_implementation
def test_forward_without_gradient_matches(linear_backend, mode):
    """Outside autodiff PYNATIVE skips the gradient work; the loss must not change."""
    data = make_data(**ALL_DATA)
    tensors = [to_ms(data[name]) for name in ("hidden", "weight")]
    options = dict(ALL_OPTIONS, chunk_size=CHUNK)
    cell = LossCell(ms.Tensor(data["target"]), ms.Tensor(data["class_weight"]),
                    ms.Tensor(data["mask"]), ms.Tensor(np.float32(1.0)), options)
    expected, _ = oracle(dict(data, bias=None), options, ms.float32, 1.0)
    assert_close(to_numpy(cell(*tensors, None)), expected, ms.float32, "loss")


def unfused_logits(hidden, weight, bias, options):
    logits = ops.matmul(hidden, weight.T)
    if bias is not None:
        logits = logits + bias
    logits = logits * options.get("logit_scale", 1.0)
    cap = options.get("logit_softcap", 0.0)
    return ops.tanh(logits / cap) * cap if cap > 0 else logits


CELL_CASES = {  # constructor options, make_data keywords
    "default-masked": ({}, {"mask": True, "ignore_fraction": 0.2}),
    "everything": ({"label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.02,
                    "logit_softcap": 4.0, "logit_scale": 1.3},
                   {"mask": True, "ignore_fraction": 0.2, "bias": True, "class_weight": True}),
    "per-token": ({"calculate_per_token_loss": True}, {"mask": True, "class_weight": True}),
    "sum": ({"reduction": "sum"}, {"mask": True}),
    "none": ({"reduction": "none"}, {"mask": True, "bias": True}),
}


@each_implementation
@pytest.mark.parametrize("case", CELL_CASES.values(), ids=CELL_CASES.keys())
def test_cell_matches_unfused_cross_entropy_loss(linear_backend, mode, case):
    """LinearCrossEntropyLoss(hidden, weight) == CrossEntropyLoss(hidden @ weight.T + bias),
    value, shape and gradients, and the oracle with MindFormers' 1e-8 denominator guard."""
    options, data_options = case
    data = make_data(seed=3, **data_options)
    logit_options = {key: options.pop(key) for key in ("logit_softcap", "logit_scale")
                     if key in options}
    fused = LinearCrossEntropyLoss(weight=data["class_weight"], chunk_size=CHUNK,
                                   **options, **logit_options)
    unfused = CrossEntropyLoss(weight=data["class_weight"], **options)
    hidden, weight = to_ms(data["hidden"]), to_ms(data["weight"])
    bias = None if data["bias"] is None else to_ms(data["bias"])
    label = ms.Tensor(data["target"].astype(np.int32))
    mask = ms.Tensor(data["mask"])

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def fused_loss(h, w, b):
        return first(fused(h, w, label, mask, b)).sum()

    def unfused_loss(h, w, b):
        return first(unfused(unfused_logits(h, w, b, logit_options), label, mask)).sum()

    positions = (0, 1) if bias is None else (0, 1, 2)
    fused_grads = ms.grad(fused_loss, grad_position=positions)(hidden, weight, bias)
    unfused_grads = ms.grad(unfused_loss, grad_position=positions)(hidden, weight, bias)
    fused_out = fused(hidden, weight, label, mask, bias)
    unfused_out = unfused(unfused_logits(hidden, weight, bias, logit_options), label, mask)
    fused_out = fused_out if isinstance(fused_out, tuple) else (fused_out,)
    unfused_out = unfused_out if isinstance(unfused_out, tuple) else (unfused_out,)
    for ours, theirs in zip(fused_out, unfused_out):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == ms.float32
        assert_close(to_numpy(ours), to_numpy(theirs), ms.float32, "unfused value")
    for ours, theirs in zip(fused_grads, unfused_grads):
        assert_close_to_peak(to_numpy(ours), to_numpy(theirs), ms.float32, "unfused gradient")

    reduction = options.get("reduction", "mean")
    reduction = "per_token" if options.get("calculate_per_token_loss") else reduction
    expected, expected_grads = torch_linear_cross_entropy(
        data["hidden"], data["weight"], data["target"], bias=data["bias"],
        class_weight=data["class_weight"], mask=data["mask"], reduction=reduction,
        label_smoothing=options.get("label_smoothing", 0.0),
        zloss_scale=options.get("lse_square_scale_for_zloss", 0.0),
        softcap=logit_options.get("logit_softcap", 0.0),
        scale=logit_options.get("logit_scale", 1.0), guard=1e-8)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for ours, theirs in zip(fused_out, expected):
        assert_close(to_numpy(ours).reshape(np.shape(theirs)), theirs, ms.float32, "oracle")
    for ours, name in zip(fused_grads, ("hidden", "weight", "bias")):
        assert_close_to_peak(to_numpy(ours), expected_grads[name], ms.float32, name)


def test_cell_flattens_leading_dims(mode):
    data = make_data(n_rows=12, mask=True)
    cell = LinearCrossEntropyLoss(chunk_size=CHUNK)
    flat = cell(to_ms(data["hidden"]), to_ms(data["weight"]), ms.Tensor(data["target"]),
                ms.Tensor(data["mask"]))
    batched = cell(to_ms(data["hidden"].reshape(2, 6, H)), to_ms(data["weight"]),
                   ms.Tensor(data["target"].reshape(2, 6)), ms.Tensor(data["mask"].reshape(2, 6)))
    assert batched.shape == (1,)
    assert_close(to_numpy(batched), to_numpy(flat), ms.float32, "batched")


def test_cell_nan_check_raises():
    data = make_data()
    data["hidden"][3, 0] = np.nan
    cell = LinearCrossEntropyLoss(check_for_nan_in_loss_and_grad=True)
    with pytest.raises(RuntimeError, match="loss is not finite"):
        cell(to_ms(data["hidden"]), to_ms(data["weight"]), ms.Tensor(data["target"]))


def test_automatic_layout_follows_the_budget():
    """The chunk (2 float32 [rows, V] buffers, 4 with the softcap) fits 1/16 of the float32
    logits within [64 MiB, 256 MiB], with at least 256 rows while 256 MiB allows; each [block, H]
    float32 temporary of the weight-gradient accumulation fits a quarter of the chunk's working
    set and 32 MiB, in equal blocks; chunk_size overrides the rows."""
    assert (MIN_WORKSPACE, MAX_WORKSPACE, MIN_CHUNK_ROWS, MAX_BLOCK_BYTES) == (
        64 << 20, 256 << 20, 256, 32 << 20)
    assert chunk_layout("api", 8192, 1024, 32000, 0.0, None) == (
        MIN_WORKSPACE // (32000 * 8), 4000)
    assert chunk_layout("api", 8192, 1024, 32000, 30.0, None) == (256, 8000)
    assert chunk_layout("api", 4096, 1024, 128256, 0.0, None) == (256, 128256 // 16)
    assert chunk_layout("api", 65536, 1024, 128256, 0.0, None) == (
        MAX_WORKSPACE // (128256 * 8), 128256 // 16)
    assert chunk_layout("api", 4096, 4096, 256000, 0.0, None) == (
        MAX_WORKSPACE // (256000 * 8), 2048)
    assert chunk_layout("api", 10, 8, 37, 0.0, None) == (10, 37)
    assert chunk_layout("api", N, H, V, 0.0, CHUNK) == (CHUNK, 8)
    assert chunk_layout("api", N, H, V, 0.0, 100) == (N, V)


def test_cpu_kernel_row_block_follows_the_budget():
    """The block's buffers and the d hidden output fit ROW_BLOCK_FRACTION (1/32) of the float32
    logits, the block within [1 MiB, 256 MiB], at least 128 rows; chunk_size is the rows per
    block."""
    assert (ROW_BLOCK_FRACTION, MIN_BLOCK_WORKSPACE, MAX_BLOCK_WORKSPACE, MIN_ROW_BLOCK) == (
        1 / 32, 1 << 20, 256 << 20, 128)
    # d hidden (32 MiB) takes the whole 1/32 (31.25 MiB): the minimum rows
    assert row_block_layout("api", 8192, 1024, 32000, ms.float32, None) == 128
    # bfloat16: + a float32 [rows, H] d hidden block
    assert row_block_layout("api", 16384, 1024, 128256, ms.bfloat16, None) == \
        (16384 * 128256 * 4 // 32 - 16384 * 1024 * 2) // (128256 * 4 + 1024 * 4)
    assert row_block_layout("api", 1 << 20, 1024, 256000, ms.float32, None) == \
        MAX_BLOCK_WORKSPACE // (256000 * 4)
    assert row_block_layout("api", 10, 8, 37, ms.float32, None) == 10
    assert row_block_layout("api", 1 << 20, 2, 1000, ms.float32, None) == \
        ((1 << 20) * 1000 * 4 // 32 - (1 << 20) * 2 * 4) // 4000
    assert row_block_layout("api", 4096, 8, 100, ms.float32, None) == MIN_BLOCK_WORKSPACE // 400
    assert row_block_layout("api", N, H, V, ms.float32, CHUNK) == CHUNK
    assert row_block_layout("api", N, H, V, ms.float32, 100) == N
    assert row_block_layout("api", 0, H, V, ms.float32, None) == 1


def test_composed_row_chunks_match_the_cpu_kernel(mode, monkeypatch):
    """MS_XENT_BACKEND=composed runs the row chunks over the composed per-row cross-entropy (no
    CPU-only piece): same loss and gradients as the oneDNN CPU kernel (rtol 1e-5)."""
    rng = np.random.default_rng(11)
    n_rows, n_hidden, n_vocab = 64, 32, 257
    hidden = ms.Tensor(rng.standard_normal((n_rows, n_hidden)).astype(np.float32))
    weight = ms.Tensor((rng.standard_normal((n_vocab, n_hidden)) / 3).astype(np.float32))
    bias = ms.Tensor(rng.standard_normal(n_vocab).astype(np.float32))
    target_np = rng.integers(0, n_vocab, n_rows)
    target_np[::7] = -100
    target = ms.Tensor(target_np.astype(np.int32))
    class_weight = ms.Tensor(rng.uniform(0.5, 2.0, n_vocab).astype(np.float32))
    rows_backends = []
    row_kernels = backends.row_kernels

    def spy(name, *args):
        rows_backends.append(name)
        return row_kernels(name, *args)

    monkeypatch.setattr(backends, "row_kernels", spy)
    # Fresh per-chunk Cells, so that the spy sees which rows backend each one is built on (an
    # earlier test with the same static options would otherwise have left them built).
    monkeypatch.setattr(linear_chunks, "_CELLS", {})
    results = {}
    for name in ("cpu", "composed"):
        def loss_of(h, w, b):
            return linear_cross_entropy(h, w, target, bias=b, class_weight=class_weight,
                                        label_smoothing=0.1, lse_square_scale_for_zloss=1e-3,
                                        chunk_size=24)

        with ms_xent.use_backend(name):
            loss, grads = ms.value_and_grad(loss_of, grad_position=(0, 1, 2))(hidden, weight,
                                                                               bias)
        results[name] = [loss.asnumpy()] + [grad.asnumpy() for grad in grads]
    assert rows_backends and set(rows_backends) == {backends.COMPOSED}
    for what, kernel, composed in zip(("loss", "hidden", "weight", "bias"), results["cpu"],
                                      results["composed"]):
        np.testing.assert_allclose(composed, kernel, rtol=1e-5,
                                   atol=1e-5 * float(np.abs(kernel).max()), err_msg=what)


def test_backend_choice():
    choose = backends.choose_linear_cross_entropy_backend
    cpu, chunks, composed = backends.CPU_KERNEL, backends.MATMUL_CHUNKS, backends.COMPOSED
    assert choose("CPU", onednn_available=True) == (cpu, cpu)
    assert choose("CPU", onednn_available=False) == (chunks, cpu)
    assert choose("CPU", requested="composed", onednn_available=True) == (chunks, composed)
    for device in ("Ascend", "GPU"):
        assert choose(device, onednn_available=True) == (chunks, composed)
        with pytest.raises(ValueError, match=f"MS_XENT_BACKEND=cpu needs device CPU, the device "
                                             f"is '{device}'"):
            choose(device, requested="cpu")
    # What every other test here relies on: this MindSpore wheel ships oneDNN, so the default on
    # this machine is the CPU kernel.
    assert cpu_linear.onednn_library() is not None
    with ms_xent.use_backend("auto"):
        assert backends.linear_cross_entropy_backend(True) == (cpu, cpu)


@each_implementation
def test_bad_target_is_refused_at_run_time_in_graph_mode(linear_backend):
    """GRAPH mode cannot check target values before the graph runs: the run fails, naming the
    value and the valid range (the class-weight gather sees it first; the kernels refuse such
    targets too, see tests/sanitizers)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    data = make_data()
    data["target"][4] = V
    cell = LossCell(ms.Tensor(data["target"]), None, None, ms.Tensor(np.float32(1.0)), {})
    with pytest.raises(RuntimeError, match=rf"\[0, {V}\), but got {V}"):
        cell(to_ms(data["hidden"]), to_ms(data["weight"]), None).asnumpy()


BAD_INPUTS = {  # keyword overrides -> (exception, message pattern)
    "hidden-rank": ({"hidden": np.zeros((H,), np.float32)}, ValueError,
                    r"`hidden` must be \[\.\.\., H\]"),
    "batch-dims": ({"hidden": np.zeros((2, 3, H), np.float32)}, ValueError,
                   r"`target` must have shape \(2, 3\)"),
    "shift": ({"shift": 1}, TypeError, "`shift` must be a bool"),
    "return-lse": ({"return_lse": None}, TypeError, "`return_lse` must be a bool"),
    "weight-columns": ({"weight": np.zeros((V, H + 1), np.float32)}, ValueError,
                       f"must have H = {H} columns"),
    "target-dtype": ({"target": np.zeros(N, np.float32)}, TypeError,
                     "`target` must be int32 or int64"),
    "target-length": ({"target": np.zeros(N + 1, np.int64)}, ValueError, r"shape \(13,\)"),
    "target-value": ({"target": np.full(N, V, np.int64)}, ValueError,
                     f"value {V} at position 0 is outside"),
    "bias-shape": ({"bias": np.zeros(V + 1, np.float32)}, ValueError, r"`bias` must have shape"),
    "class-weight-inf": ({"class_weight": np.full(V, np.inf, np.float32)}, ValueError,
                         "`class_weight` must be finite, got inf at class 0"),
    "mask-shape": ({"input_mask": np.ones(N + 2, np.float32)}, ValueError, "`input_mask`"),
    "softcap": ({"logit_softcap": -1.0}, ValueError, "`logit_softcap` must be >= 0"),
    "scale": ({"logit_scale": 0.0}, ValueError, "`logit_scale` must be non-zero"),
    "chunk-size": ({"chunk_size": 0}, ValueError, "`chunk_size` must be a positive int"),
    "reduction": ({"reduction": "avg"}, ValueError, "`reduction` must be one of"),
    "per-token-none": ({"return_per_token": True, "reduction": "none"}, ValueError,
                       "return_per_token=True"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument(case):
    overrides, error, pattern = case
    data = make_data()
    arguments = {"hidden": data["hidden"], "weight": data["weight"], "target": data["target"]}
    arguments.update(overrides)
    arguments = {key: ms.Tensor(value) if isinstance(value, np.ndarray) else value
                 for key, value in arguments.items()}
    with pytest.raises(error, match=re.compile(rf"linear_cross_entropy: .*{pattern}")):
        linear_cross_entropy(**arguments)


def test_bad_input_is_reported_when_the_graph_compiles():
    ms.set_context(mode=ms.GRAPH_MODE)
    data = make_data()
    cell = LossCell(ms.Tensor(data["target"][:-1]), None, None, ms.Tensor(np.float32(1.0)), {})
    with pytest.raises(ValueError, match=r"`target` must have shape \(13,\)"):
        cell(to_ms(data["hidden"]), to_ms(data["weight"]), None)


def test_cell_rejects_vocabulary_parallel():
    with pytest.raises(NotImplementedError, match="model_parallel = 2"):
        LinearCrossEntropyLoss(parallel_config={"data_parallel": 1, "model_parallel": 2})


class TinyLanguageModel(nn.Cell):
    """A projection to hidden states and an lm_head weight [V, H]; the loss gets both (fused) or
    the logits (unfused)."""

    def __init__(self, fused, seed=7):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.projection = ms.Parameter(to_ms(rng.standard_normal((H, H)) / np.sqrt(H)),
                                       name="projection")
        self.lm_head = ms.Parameter(to_ms(rng.standard_normal((V, H)) / np.sqrt(H)),
                                    name="lm_head")
        self.fused = fused
        options = {"label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.01}
        self.loss = (LinearCrossEntropyLoss(chunk_size=CHUNK, **options) if fused
                     else CrossEntropyLoss(**options))

    def construct(self, features, label, mask):
        hidden = ops.tanh(ops.matmul(features, self.projection))
        if self.fused:
            return self.loss(hidden, self.lm_head, label, mask)
        return self.loss(ops.matmul(hidden, self.lm_head.T), label, mask)


@each_implementation
def test_training_steps_match_the_unfused_model(linear_backend, mode):
    """TrainOneStepCell + SGD: the lm_head Parameter gets the fused gradient; three steps give
    the same losses and parameters as the unfused model."""
    data = make_data(mask=True, ignore_fraction=0.2)
    features, label, mask = to_ms(data["hidden"]), ms.Tensor(data["target"]), ms.Tensor(
        data["mask"])
    runs = []
    for fused in (True, False):
        model = TinyLanguageModel(fused)
        step = nn.TrainOneStepCell(model, nn.SGD(model.trainable_params(), learning_rate=0.5))
        losses = [float(step(features, label, mask).asnumpy()[0]) for _ in range(3)]
        runs.append((losses, model.lm_head.asnumpy(), model.projection.asnumpy()))
    (fused_losses, fused_head, fused_projection), (losses, head, projection) = runs
    assert fused_losses[-1] < fused_losses[0]
    np.testing.assert_allclose(fused_losses, losses, rtol=2e-5)
    np.testing.assert_allclose(fused_head, head, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(fused_projection, projection, rtol=2e-5, atol=2e-6)


@each_implementation
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_raises(linear_backend, mode, reduction):
    """The gradient of a gradient is refused with a clear error in every mode and backend (the
    backward returns gradients computed by fused kernels: it used to be a silent zero)."""
    data = make_data()
    hidden, weight = to_ms(data["hidden"]), to_ms(data["weight"])
    target = ms.Tensor(data["target"])

    def loss(h, w):
        return linear_cross_entropy(h, w, target, reduction=reduction).sum()

    first = ms.grad(loss, grad_position=0)
    assert first(hidden, weight).shape == hidden.shape

    def gradient_norm(h, w):
        return (first(h, w) ** 2).sum()

    with pytest.raises((NotImplementedError, RuntimeError),
                       match="second-order differentiation .* is not supported"):
        ms.grad(gradient_norm, grad_position=0)(hidden, weight)


def shifted(array, fill):
    return np.concatenate([array[..., 1:], np.full(array.shape[:-1] + (1,), fill)], axis=-1)


OUTPUT_CASES = {  # options
    "mean": {},
    "sum-shift": {"reduction": "sum", "shift": True},
    "none-shift": {"reduction": "none", "shift": True},
    "per-token": {"return_per_token": True, "class_weight": True},
    "mean-class-weight-shift": {"class_weight": True, "shift": True},
}


@each_implementation
@pytest.mark.parametrize("case", OUTPUT_CASES.values(), ids=OUTPUT_CASES.keys())
def test_batch_dims_shift_and_extra_outputs_vs_torch(linear_backend, mode, case):
    """hidden [B, T, H] with target and mask [B, T]; shift scores position t against label t + 1
    (the last position ignored); return_z_loss and return_lse: the float64 PyTorch oracle on the
    flattened, shifted inputs (loss, z-loss, lse, gradients)."""
    options = dict(case)
    batch, steps, zloss_scale = 3, 5, 0.02
    data = make_data(n_rows=batch * steps, seed=4, ignore_fraction=0.2, mask=True,
                     class_weight=options.pop("class_weight", False))
    target = data["target"].reshape(batch, steps)
    mask = data["mask"].reshape(batch, steps)
    flat_target, flat_mask = target, mask
    if options.get("shift"):
        flat_target, flat_mask = shifted(target, IGNORE_INDEX), shifted(mask, 0.0)
    reduction = "per_token" if options.get("return_per_token") else options.get("reduction",
                                                                                  "mean")
    upstream = (np.random.default_rng(1).uniform(0.5, 2.0, batch * steps)
                if reduction == "none" else UPSTREAM)
    expected, expected_grads = torch_linear_cross_entropy(
        data["hidden"], data["weight"], flat_target.reshape(-1), class_weight=data["class_weight"],
        mask=flat_mask.reshape(-1), zloss_scale=zloss_scale, reduction=reduction,
        upstream=upstream)
    class_weight = (None if data["class_weight"] is None
                    else ms.Tensor(data["class_weight"]))

    class Outputs(nn.Cell):
        def construct(self, hidden, weight):
            return linear_cross_entropy(hidden, weight, ms.Tensor(target.astype(np.int32)),
                                        class_weight=class_weight, input_mask=ms.Tensor(mask),
                                        lse_square_scale_for_zloss=zloss_scale,
                                        return_z_loss=True, return_lse=True, chunk_size=CHUNK,
                                        **options)

    outputs = Outputs()
    hidden = to_ms(data["hidden"].reshape(batch, steps, H))
    weight = to_ms(data["weight"])
    result = [to_numpy(part) for part in outputs(hidden, weight)]
    logits = data["hidden"].astype(np.float64) @ data["weight"].astype(np.float64).T
    lse = np.log(np.exp(logits).sum(axis=1))
    counted = (flat_target.reshape(-1) != IGNORE_INDEX) * flat_mask.reshape(-1)
    z_rows = zloss_scale * counted * lse ** 2
    assert result[-1].shape == (batch, steps)
    assert_close(result[-1], lse.reshape(batch, steps), ms.float32, "lse")
    if reduction == "per_token":
        numerator, denominator = expected
        assert_close(result[0], numerator, ms.float32, "numerator")
        assert_close(result[1], denominator, ms.float32, "denominator")
        assert_close(result[2], z_rows.sum() * denominator / counted.sum(), ms.float32, "z-loss")
    elif reduction == "none":
        assert result[0].shape == (batch, steps)
        assert_close(result[0], expected.reshape(batch, steps), ms.float32, "loss")
        assert_close(result[1], z_rows.reshape(batch, steps), ms.float32, "z-loss")
    else:
        assert_close(result[0], expected, ms.float32, "loss")
        z_loss = z_rows.sum() / (counted.sum() if reduction == "mean" else 1.0)
        assert_close(result[1], z_loss, ms.float32, "z-loss")

    upstream_tensor = ms.Tensor(np.asarray(upstream, np.float32).reshape(np.shape(result[0])))

    def weighted(h, w):
        return (outputs(h, w)[0] * upstream_tensor).sum()

    grads = ms.grad(weighted, grad_position=(0, 1))(hidden, weight)
    assert grads[0].shape == (batch, steps, H)
    assert_close_to_peak(to_numpy(grads[0]).reshape(-1, H), expected_grads["hidden"], ms.float32,
                         "hidden")
    assert_close_to_peak(to_numpy(grads[1]), expected_grads["weight"], ms.float32, "weight")


ACCURACY_CASES = {  # name: (c, bias): logits = c I + bias on the identity hidden states
    "offset-1e6": (1.0, 1e6 + 0.0625 * np.arange(V)),
    "offset-1e30": (1.0, np.full(V, 1e30)),
    "offset-3e38": (1.0, np.full(V, 3e38)),
    "confident-1e-4": (float(-np.log(1e-4 / (V - 1))), np.zeros(V)),
    "confident-1e-7": (float(-np.log(1e-7 / (V - 1))), np.zeros(V)),
}


@pytest.mark.parametrize("case", ACCURACY_CASES.values(), ids=ACCURACY_CASES.keys())
def test_cpu_kernel_accuracy_on_offset_and_confident_rows(mode, case):
    """float32 logits offset by up to 3e38, or with p_y up to 1 - 1e-7, against float64 taken
    about each row's max: loss relative error <= 1e-5, logit gradient within 1e-6 of the row's
    peak. hidden = I and weight = c I make the float32 logits exact (c I + bias) and
    d loss / d hidden = c * d loss / d logits."""
    c, bias = case
    hidden = np.eye(V, dtype=np.float32)
    weight = (c * np.eye(V)).astype(np.float32)
    target = np.arange(V)
    x = (hidden.astype(np.float64) @ weight.T + bias).astype(np.float32).astype(np.float64)
    shifted_x = x - x.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted_x).sum(axis=1))
    want_loss = log_sum - shifted_x[target, target]
    want_grad = np.exp(shifted_x - log_sum[:, None])
    want_grad[target, target] = np.expm1(-want_loss)
    tensors = (to_ms(hidden), to_ms(weight), to_ms(bias))

    def loss(h, w, b):
        return linear_cross_entropy(h, w, ms.Tensor(target), bias=b, reduction="sum")

    # The CPU kernel's bound, whatever MS_XENT_BACKEND the suite runs with.
    with ms_xent.use_backend("cpu"):
        rows = to_numpy(linear_cross_entropy(*tensors[:2], ms.Tensor(target), bias=tensors[2],
                                             reduction="none"))
        grad_hidden = to_numpy(ms.grad(loss, grad_position=0)(*tensors))
    assert np.abs(rows / want_loss - 1).max() <= 1e-5
    grad_error = np.abs(grad_hidden / weight.max() - want_grad).max(axis=1)
    assert (grad_error <= 1e-6 * np.abs(want_grad).max(axis=1)).all()


def test_zloss_scale_of_one_and_above_is_accepted():
    """Only the vendor-signature op keeps the vendor's [0, 1) z-loss range; linear CE takes any
    finite s >= 0 (mean CE plus s times the mean lse^2, against float64 numpy)."""
    rng = np.random.default_rng(3)
    hidden, weight = rng.standard_normal((8, 4)), rng.standard_normal((16, 4))
    target = np.arange(8)
    logits = hidden.astype(np.float32).astype(np.float64) @ weight.astype(np.float32).T
    lse = np.log(np.exp(logits).sum(axis=1))
    expected = np.mean(lse - logits[np.arange(8), target]) + 1.5 * np.mean(lse ** 2)
    loss = linear_cross_entropy(ms.Tensor(hidden.astype(np.float32)),
                                ms.Tensor(weight.astype(np.float32)), ms.Tensor(target),
                                lse_square_scale_for_zloss=1.5)
    np.testing.assert_allclose(float(loss.asnumpy()), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="lse_square_scale_for_zloss"):
        linear_cross_entropy(ms.Tensor(hidden.astype(np.float32)),
                             ms.Tensor(weight.astype(np.float32)), ms.Tensor(target),
                             lse_square_scale_for_zloss=float("inf"))
