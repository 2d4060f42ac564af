"""Op layer of the fused cross-entropy: the aot primitives over the C++ kernels and their bprop.

Forward primitives return per-row float32 values; :mod:`ms_xent._backends.cpu.backend` reduces
them. The bprop of every forward primitive calls the
matching backward primitive with the per-row gradients of ``loss_rows`` and ``lse``, and
recomputes the softmax from the logits the caller already holds: nothing of size [N, C] is
kept between forward and backward besides the logits themselves.

=====================  ==================================  ===========================================
primitive              inputs                              outputs
=====================  ==================================  ===========================================
hard forward           input[N,C], target[N], weight[C]    loss_rows[N], lse[N], row_weight[N]
hard forward+log_prob  same                                same + log_prob[N,C]
soft forward           input[N,C], target[N,C], weight[C]  loss_rows[N], lse[N]
soft forward+log_prob  same                                same + log_prob[N,C]
backward (hard/soft)   input, target, weight, shift[N],    grad[N,C]
                       row_grad[N], row_grad_lse[N]
=====================  ==================================  ===========================================

``row_weight[n]`` is the row's share of the "mean" denominator, ``w[target[n]]`` or 0 when the row
is ignored. ``shift`` is ``lse`` when ``input`` holds logits and 0 when it holds log-probabilities.
"""

import mindspore as ms
from mindspore import ops

from ms_xent._backends.cpu.aot_primitive import (FLOAT_DTYPES, INDEX_DTYPES, AotPrimitive,
                                                 KernelSpec, dtype_rows)

F32 = ("float32",)


def _rows_f32(count):
    return lambda *input_dtypes: (ms.float32,) * count


def _rows_f32_and_log_prob(count):
    return lambda input_dtype, *rest: (ms.float32,) * count + (input_dtype,)


HARD_FORWARD = KernelSpec(
    "XentHardForward", ("input", "target", "weight"), ("loss_rows", "lse", "row_weight"),
    dtype_rows(FLOAT_DTYPES, INDEX_DTYPES, F32, F32, F32, F32), _rows_f32(3))
HARD_FORWARD_LOG_PROB = KernelSpec(
    "XentHardForwardLogProb", ("input", "target", "weight"),
    ("loss_rows", "lse", "row_weight", "log_prob"),
    dtype_rows(FLOAT_DTYPES, INDEX_DTYPES, F32, F32, F32, F32, FLOAT_DTYPES, tie={6: 0}),
    _rows_f32_and_log_prob(3))
SOFT_FORWARD = KernelSpec(
    "XentSoftForward", ("input", "target", "weight"), ("loss_rows", "lse"),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, tie={1: 0}), _rows_f32(2))
SOFT_FORWARD_LOG_PROB = KernelSpec(
    "XentSoftForwardLogProb", ("input", "target", "weight"), ("loss_rows", "lse", "log_prob"),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, FLOAT_DTYPES, tie={1: 0, 5: 0}),
    _rows_f32_and_log_prob(2))

_BACKWARD_INPUTS = ("input", "target", "weight", "shift", "row_grad", "row_grad_lse")
HARD_BACKWARD = KernelSpec(
    "XentHardBackward", _BACKWARD_INPUTS, ("grad",),
    dtype_rows(FLOAT_DTYPES, INDEX_DTYPES, F32, F32, F32, F32, FLOAT_DTYPES, tie={6: 0}),
    lambda input_dtype, *rest: input_dtype)
SOFT_BACKWARD = KernelSpec(
    "XentSoftBackward", _BACKWARD_INPUTS, ("grad",),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, F32, FLOAT_DTYPES, tie={1: 0, 6: 0}),
    lambda input_dtype, *rest: input_dtype)


def cross_entropy_attrs(ignore_index, label_smoothing, weighted):
    """Kernel attributes shared by the forward and backward primitives."""
    return {"ignore_index": int(ignore_index), "label_smoothing": float(label_smoothing),
            "weighted": bool(weighted)}


class CrossEntropyBackward(AotPrimitive):
    """grad[N, C] from per-row gradients; see the kernel header for the formula."""

    def __init__(self, ignore_index=-100, label_smoothing=0.0, weighted=False, soft=False):
        super().__init__(SOFT_BACKWARD if soft else HARD_BACKWARD,
                         cross_entropy_attrs(ignore_index, label_smoothing, weighted))


class CrossEntropyForward(AotPrimitive):
    """Per-row cross-entropy of logits; differentiable w.r.t. ``loss_rows`` and ``lse``.

    ``soft`` selects probability targets [N, C]; ``with_log_prob`` adds the log_prob output
    (only the public vendor-compatible op needs it; its gradient is not propagated).
    """

    def __init__(self, ignore_index=-100, label_smoothing=0.0, weighted=False, soft=False,
                 with_log_prob=False):
        specs = {(False, False): HARD_FORWARD, (False, True): HARD_FORWARD_LOG_PROB,
                 (True, False): SOFT_FORWARD, (True, True): SOFT_FORWARD_LOG_PROB}
        backward = CrossEntropyBackward(ignore_index, label_smoothing, weighted, soft)

        def bprop(logits, target, weight, out, dout):
            grad = backward(logits, target, weight, out[1], dout[0], dout[1])
            return grad, ops.zeros_like(target), ops.zeros_like(weight)

        super().__init__(specs[(bool(soft), bool(with_log_prob))],
                         cross_entropy_attrs(ignore_index, label_smoothing, weighted), bprop=bprop)
