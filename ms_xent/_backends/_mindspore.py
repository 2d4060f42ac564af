"""Every MindSpore work-around and private-API use of ms_xent, each once, with its reason.

The backends and the functional layer import these instead of repeating them per call site.
"""

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr
from mindspore.common import _Function
from mindspore.graph.api import _pynative_executor
from mindspore.ops._primitive_cache import _get_cache_prim, _is_need_compile

F32 = ms.float32

# PyTorch-style autograd function (forward/backward with a context) for PYNATIVE code that keeps
# state between forward and backward; MindSpore exports it only from a private module.
Function = _Function


def known(dim):
    """A dimension known at compile time (dynamic dims are None or negative)."""
    return dim is not None and dim >= 0


def static_size(dim):
    """The dimension, or -1 when it is only known at run time."""
    return dim if known(dim) else -1


def _placeholder():
    return 0


def executing_eagerly():
    """True in PyNative execution, False while a graph (GRAPH_MODE, ms.jit) is being compiled.

    MindSpore has no public predicate; ``_is_need_compile`` answers it for a plain function."""
    return not _is_need_compile(_placeholder)


@constexpr
def _on_cpu():
    return ms.get_context("device_target") == "CPU"


def relaid_out(tensor, layout):
    """``layout(tensor)`` for a layout op (reshape, transpose), also for bfloat16 in GRAPH mode.

    MindSpore 2.9's CPU Reshape and Transpose have no bfloat16 kernel in GRAPH mode ("Select CPU
    operator[Reshape] fail! Unsupported data type!"; flatten, view, mint.reshape and unbind + cat
    fail alike, and there is no bit cast to int16). There a bfloat16 tensor is relaid out as
    float32 (both casts are exact: every bfloat16 is a float32) at the cost of a float32 copy,
    twice the tensor's size, alive during the op. PyNative mode and other devices lay out
    bfloat16 directly."""
    if tensor.dtype == ms.bfloat16 and _on_cpu() and not executing_eagerly():
        return layout(tensor.astype(F32)).astype(ms.bfloat16)
    return layout(tensor)


def reshape(tensor, shape):
    """``tensor.reshape(shape)`` through :func:`relaid_out` (bfloat16 in GRAPH mode on CPU)."""
    return relaid_out(tensor, lambda t: t.reshape(shape))


def gradients_recorded():
    """PYNATIVE: whether autodiff records the current call (``_pynative_executor`` is private)."""
    return _pynative_executor.requires_grad()


def cached_primitive(cls, *args):
    """One primitive instance per (class, arguments) in PyNative; a fresh one when compiling.

    MindSpore's own ``_get_cache_prim`` (private) does exactly this and is graph-aware."""
    return _get_cache_prim(cls)(*args)


def total(values):
    """Sum of all entries; exactly 0 for an empty tensor.

    MindSpore 2.9's CPU ReduceSum leaves its output uninitialised for an empty input (it returned
    1.4e23 here), so a zero is prepended."""
    return ops.cat((ops.zeros((1,), values.dtype), values.reshape(-1))).sum()


def counted_rows(target, ignore_index):
    """``target != ignore_index`` as bool [N], compared in int64.

    MindSpore converts a Python int to the tensor's dtype before comparing, so an int32 target
    compared with ignore_index = 2**32 would see 0 (wrapped) and ignore the rows of class 0."""
    return target.astype(ms.int64) != ignore_index


def safe_divide(numerator, denominator):
    """numerator / denominator; where the denominator is exactly 0 (every row ignored or masked
    out, or class weights summing to 0), numerator * 0 with a zero gradient: 0, or NaN when the
    numerator is not finite (a masked-out row of NaN logits keeps the loss NaN, as it does without
    class weights). A negative denominator (weights of either sign) divides as usual. Selecting
    twice keeps the gradient of the unused branch finite."""
    nonzero = denominator != 0
    safe = ops.select(nonzero, denominator, ops.ones_like(denominator))
    return ops.select(nonzero, numerator / safe, numerator * 0)


def log1p(u):
    """log(1 + u) to a few float32 ulp for every u >= -1, also where |u| << 1.

    MindSpore 2.9's CPU ``ops.log1p`` is log(1 + u) after rounding 1 + u (measured:
    log1p(1e-7) = 1.19e-7), and its vectorised ``ops.log`` is not accurate enough near 1 for a
    correction from log(1 + u). For |u| < 1/2: log(1 + u) = 2 atanh(s), s = u / (2 + u) in
    (-1/3, 1/5), by its odd series up to s^17 (first omitted term < 4e-10 relative); elsewhere
    log(1 + u) has no cancellation."""
    s = u / (2.0 + u)
    s2 = s * s
    series = s2 / 17.0  # arithmetic and select only: usable inside Cells with a bprop
    for power in range(15, 1, -2):
        series = (series + 1.0 / power) * s2
    small = 2.0 * s * (1.0 + series)
    return ops.select((u < 0.5) & (u > -0.5), small, ops.log(1.0 + u))


def expm1(x):
    """exp(x) - 1 to a few float32 ulp, also where |x| << 1.

    MindSpore 2.9's CPU ``ops.expm1`` is exp(x) - 1 (measured: expm1(-1e-7) = -1.19e-7). For
    |x| < 1/2 the Taylor series up to x^10 / 10! (first omitted term < 3e-11 relative);
    elsewhere exp(x) - 1 has no cancellation."""
    series = x / 10.0  # arithmetic and select only: usable inside Cells with a bprop
    for power in range(9, 0, -1):
        series = (series + 1.0) * x / float(power)
    return ops.select((x < 0.5) & (x > -0.5), series, ops.exp(x) - 1.0)


class _Tanh(nn.Cell):
    """tanh(u) to a few float32 ulp, with the derivative sech^2(u) = 4 w / (1 + w)^2,
    w = exp(-2 |u|) (no cancellation; autodiff of the quotient below would cancel).

    MindSpore 2.9's CPU ``ops.tanh`` is off by up to 1e-4 near |u| = 5 (measured: tanh(-4.99986)
    = -1.0000098, beyond -1), which makes a softcap's 1 - tanh^2 wrong by 100 %. Here
    |tanh(u)| = -E / (E + 2), E = expm1(-2 |u|) in (-1, 0]: no overflow for any u, full relative
    precision near 0; arithmetic and select only (``ops.clamp`` inside a Cell whose caller's bprop
    runs it again breaks MindSpore 2.9's GRAPH autodiff: "The func graph is empty")."""

    def construct(self, u):
        e = expm1(-2.0 * ops.abs(u))
        magnitude = -e / (e + 2.0)
        return ops.select(u < 0, -magnitude, magnitude)

    def bprop(self, u, out, dout):
        w = ops.exp(-2.0 * ops.abs(u))
        return (dout * (4.0 * w / ((1.0 + w) * (1.0 + w))),)


tanh = _Tanh()


def softmax_input(x):
    """``x`` with -inf entries raised to -3e38, for MindSpore's fused CPU Softmax kernel.

    MindSpore 2.9's CPU Softmax returns one-hot rows for every row after a row of all -inf
    logits in the same call (measured: errors up to 0.85 in the following rows; NaN and +inf
    rows do not do this). exp(-3e38 - max) is 0 exactly as exp(-inf - max) for a row with a finite
    maximum; a row of all -inf becomes uniform instead of NaN, and the callers set its results
    from its own maximum. NaN and +inf pass through."""
    return ops.select(x == float("-inf"), -3.0e38, x)


def second_order_error(api):
    return NotImplementedError(
        f"{api}: second-order differentiation (the gradient of a gradient) is not supported: its "
        f"backward returns gradients computed by a fused kernel, not a differentiable graph")


def check_first_order(api):
    """PYNATIVE: raise in a Function's backward when that backward is itself being recorded
    (the gradient of a gradient). MindSpore runs such a backward with recording on, and would
    otherwise see gradients computed in the forward as constants: a silent zero."""
    if gradients_recorded():
        raise second_order_error(api)


class FirstOrderOnly(nn.Cell):
    """GRAPH: identity on the three gradients (hidden, weight, bias) a bprop returns, whose own
    gradient raises at compile time (the gradient of a gradient), instead of MindSpore's generic
    error about the kernels inside the bprop having no bprop, or of a zero for gradients
    computed in the forward."""

    def __init__(self, api):
        super().__init__()
        self.message = str(second_order_error(api))

    def construct(self, grad_hidden, grad_weight, grad_bias):
        return grad_hidden, grad_weight, grad_bias

    def bprop(self, grad_hidden, grad_weight, grad_bias, out, dout):
        raise NotImplementedError(self.message)
