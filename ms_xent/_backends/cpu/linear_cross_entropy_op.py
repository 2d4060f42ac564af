"""The fused linear + cross-entropy on CPU: one compiled kernel per call.

``csrc/linear_cross_entropy_kernel.cc`` runs the whole computation (the math is in its header):
it walks over the rows in blocks of R rows over the whole vocabulary, computes each block's
logits with oneDNN's matrix products (the library inside the MindSpore wheel,
``mindspore/lib/libdnnl.so.3``, opened by the kernel at run time), the fused cross-entropy, and
the block's gradient w.r.t. hidden (written once) and its share of the gradients w.r.t. weight
and bias (accumulated in float32). Nothing of size [N, V] exists; R (the ``row_block`` attribute)
sets the size of the one [R, V] block.

=====================  =========================================  ===============================
primitive              inputs                                     outputs
=====================  =========================================  ===============================
LinearRows             hidden[N,H], weight[V,H], bias[V],          value[N] float32
                       target[N], class_weight[V] f32,
                       row_coef[N] f32, z_coef[N] f32
LinearSumGrad          same                                       total[1] float32, grad_hidden,
                                                                  grad_weight, grad_bias (dtype
                                                                  of hidden)
=====================  =========================================  ===============================

``value_n = row_coef_n l_n + z_coef_n lse_n^2`` and ``total = sum_n value_n``. The "sum" loss runs
LinearSumGrad in its forward while gradients are recorded (PYNATIVE) or always (GRAPH), and its
backward only scales the stored gradients by the upstream gradient; the "rows" loss runs
LinearRows, and its backward runs LinearSumGrad with the per-row factors times the upstream
gradient (the logits are recomputed).
"""

import functools
import os

import mindspore as ms
from mindspore import nn

from ms_xent._backends._mindspore import (FirstOrderOnly, Function, cached_primitive,
                                          check_first_order, executing_eagerly,
                                          gradients_recorded, total)
from ms_xent._backends.cpu.aot_primitive import (FLOAT_DTYPES, INDEX_DTYPES, AotPrimitive,
                                                 KernelSpec, dtype_rows)
from ms_xent._backends.linear_chunks import no_input_grads, scaled_gradient

API = "linear_cross_entropy"
ONEDNN_LIBRARY = "libdnnl.so.3"
_INPUTS = ("hidden", "weight", "bias", "target", "class_weight", "row_coef", "z_coef")
_F32 = ("float32",)
LINEAR_ROWS = KernelSpec(
    "XentLinearRows", _INPUTS, ("value", "lse"),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES, INDEX_DTYPES, _F32, _F32, _F32, _F32,
               _F32, tie={1: 0, 2: 0}),
    lambda *input_dtypes: (ms.float32, ms.float32))
LINEAR_SUM_GRAD = KernelSpec(
    "XentLinearSumGrad", _INPUTS, ("total", "lse", "grad_hidden", "grad_weight", "grad_bias"),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES, INDEX_DTYPES, _F32, _F32, _F32, _F32,
               _F32, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={1: 0, 2: 0, 9: 0, 10: 0, 11: 0}),
    lambda hidden_dtype, *rest: (ms.float32, ms.float32, hidden_dtype, hidden_dtype,
                                 hidden_dtype))


@functools.lru_cache(maxsize=None)
def onednn_library():
    """Path of the oneDNN library shipped in the MindSpore wheel, or None when it has none (the
    functional layer then uses the chunked MatMul path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib", ONEDNN_LIBRARY)
    return path if os.path.exists(path) else None


def _attrs(static, row_block):
    ignore_index, label_smoothing, weighted, has_bias, logit_softcap, logit_scale = static
    return {"ignore_index": int(ignore_index), "label_smoothing": float(label_smoothing),
            "weighted": bool(weighted), "has_bias": bool(has_bias),
            "logit_softcap": float(logit_softcap), "logit_scale": float(logit_scale),
            "row_block": int(row_block), "gemm_library": onednn_library()}


class LinearRows(AotPrimitive):
    """value[N] of the fused linear + cross-entropy (no gradients)."""

    def __init__(self, static, row_block):
        super().__init__(LINEAR_ROWS, _attrs(static, row_block))


class LinearSumGrad(AotPrimitive):
    """sum_n value_n and its gradients w.r.t. hidden, weight and bias."""

    def __init__(self, static, row_block):
        super().__init__(LINEAR_SUM_GRAD, _attrs(static, row_block))


class _GraphSum(nn.Cell):
    """GRAPH-mode "sum": the kernel computes the gradients in the forward; the bprop scales them."""

    def __init__(self, static, row_block):
        super().__init__()
        self.sum_grad = LinearSumGrad(static, row_block)
        self.first_order_only = FirstOrderOnly(API)

    def construct(self, hidden, weight, bias, target, class_weight, row_coef, z_coef):
        return self.sum_grad(hidden, weight, bias, target, class_weight, row_coef, z_coef)

    def bprop(self, hidden, weight, bias, target, class_weight, row_coef, z_coef, out, dout):
        scale = dout[0]
        if (scale == 1).all():
            grads = (out[2], out[3], out[4])
        else:
            grads = tuple(scaled_gradient(grad, scale, grad.dtype) for grad in out[2:])
        return self.first_order_only(*grads) + no_input_grads(target, class_weight, row_coef, z_coef)


class _GraphRows(nn.Cell):
    """GRAPH-mode "rows": value[N]; the bprop recomputes the logits with the upstream factors."""

    def __init__(self, static, row_block):
        super().__init__()
        self.rows = LinearRows(static, row_block)
        self.sum_grad = LinearSumGrad(static, row_block)
        self.first_order_only = FirstOrderOnly(API)

    def construct(self, hidden, weight, bias, target, class_weight, row_coef, z_coef):
        return self.rows(hidden, weight, bias, target, class_weight, row_coef, z_coef)

    def bprop(self, hidden, weight, bias, target, class_weight, row_coef, z_coef, out, dout):
        _, _, grad_hidden, grad_weight, grad_bias = self.sum_grad(
            hidden, weight, bias, target, class_weight, dout[0] * row_coef, dout[0] * z_coef)
        return self.first_order_only(grad_hidden, grad_weight, grad_bias) + no_input_grads(
            target, class_weight, row_coef, z_coef)


class _EagerSum(Function):
    """PYNATIVE "sum": with gradients recorded, they wait in the context until the backward
    scales them; a plain call runs the forward-only kernel."""

    @staticmethod
    def forward(ctx, static, row_block, with_grads, *inputs):
        if not with_grads:
            values, lse = cached_primitive(LinearRows, static, row_block)(*inputs)
            return total(values), lse
        loss_total, lse, *grads = cached_primitive(LinearSumGrad, static, row_block)(*inputs)
        ctx.grads = grads
        return loss_total.reshape(()), lse

    @staticmethod
    def backward(ctx, dout, _):
        check_first_order(API)
        grads, ctx.grads = ctx.grads, None
        return (None, None, None) + tuple(scaled_gradient(grad, dout, grad.dtype) for grad in grads) + (None,) * 4


class _EagerRows(Function):
    """PYNATIVE "rows": keeps the inputs; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, static, row_block, *inputs):
        ctx.static = static
        ctx.row_block = row_block
        ctx.inputs = inputs
        return cached_primitive(LinearRows, static, row_block)(*inputs)

    @staticmethod
    def backward(ctx, dout, _):
        check_first_order(API)
        (hidden, weight, bias, target, class_weight, row_coef, z_coef), ctx.inputs = \
            ctx.inputs, None
        _, _, *grads = cached_primitive(LinearSumGrad, ctx.static, ctx.row_block)(
            hidden, weight, bias, target, class_weight, dout * row_coef, dout * z_coef)
        return (None, None) + tuple(grads) + (None,) * 4


def linear_cross_entropy_sum(static, row_block, hidden, weight, bias, target, class_weight,
                             row_coef, z_coef):
    """(float32 0-d ``sum_n row_coef_n l_n + z_coef_n lse_n^2``, differentiable w.r.t. hidden,
    weight and bias; float32 [N] lse, not differentiated).

    ``static`` = (ignore_index, label_smoothing, weighted, has_bias, logit_softcap, logit_scale);
    ``row_block``: rows per block (R). Tensor inputs: hidden [N, H], weight [V, H],
    bias [V] (not read when has_bias is False), target [N] int, class_weight [V] float32,
    row_coef [N] and z_coef [N] float32 (not differentiated).
    """
    inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef)
    if executing_eagerly():
        return _EagerSum.apply(static, row_block, gradients_recorded(), *inputs)
    outputs = _GraphSum(static, row_block)(*inputs)
    return outputs[0].reshape(()), outputs[1]


def linear_cross_entropy_rows(static, row_block, hidden, weight, bias, target, class_weight,
                              row_coef, z_coef):
    """(float32 [N] ``row_coef_n l_n + z_coef_n lse_n^2``, float32 [N] lse not differentiated);
    arguments as :func:`linear_cross_entropy_sum`."""
    inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef)
    if executing_eagerly():
        return _EagerRows.apply(static, row_block, *inputs)
    return _GraphRows(static, row_block)(*inputs)
