"""Op layer of the fused cross-entropy: the aot primitives over the C++ kernels and their bprop.

Forward primitives return per-row float32 values; :mod:`ms_xent._backends.cpu.backend` reduces
them. The bprop of every forward primitive calls the matching backward primitive with the per-row
gradients of ``loss_rows`` and ``lse`` and the row state (row_max, row_log_sum) of the forward,
and recomputes the softmax from the logits the caller already holds: nothing of size [N, C] is
kept between forward and backward besides the logits themselves.

=====================  ==================================  ===========================================
primitive              inputs                              outputs
=====================  ==================================  ===========================================
hard forward           input[N,C], target[N], weight[C]    loss_rows, lse, row_weight, row_max,
                                                           row_log_sum (float32 [N])
  + log_prob / argmax  same                                same + log_prob[N,C] / argmax[N] (int32,
                                                           int64: the target's dtype)
soft forward           input[N,C], target[N,C], weight[C]  loss_rows, lse, row_max, row_log_sum
  + log_prob / argmax  same                                same + log_prob[N,C] / argmax[N] (int64)
backward (hard/soft)   input, target, weight,              grad[N,C]
                       shift_max[N], shift_log_sum[N],
                       row_grad[N], row_grad_lse[N]
soft backward+target   same                                grad[N,C], grad_target[N,C]
=====================  ==================================  ===========================================

Attributes (every primitive): ignore_index, label_smoothing, weighted, logit_scale, logit_softcap
(the kernels read z = logit_softcap tanh(logit_scale x / logit_softcap), or z = logit_scale x when
logit_softcap is 0, in place of the logits x; gradients are w.r.t. x).

``row_weight[n]`` is the row's share of the "mean" denominator, ``w[target[n]]`` or 0 when the row
is ignored. lse = row_max + row_log_sum; the backward's softmax is exp((z - shift_max) -
shift_log_sum): (row_max, row_log_sum) when ``input`` holds logits, (0, 0) when it holds
log-probabilities (then logit_scale must be 1 and logit_softcap 0). The argmax is the first
index of the row's largest z (torch.argmax); it has no gradient.
"""

import mindspore as ms
from mindspore import ops

from ms_xent._backends.cpu.aot_primitive import (FLOAT_DTYPES, INDEX_DTYPES, AotPrimitive,
                                                 KernelSpec, dtype_rows)

F32 = ("float32",)
I64 = ("int64",)

HARD_ROWS = ("loss_rows", "lse", "row_weight", "row_max", "row_log_sum")
SOFT_ROWS = ("loss_rows", "lse", "row_max", "row_log_sum")
HARD_INPUT_DTYPES = (FLOAT_DTYPES, INDEX_DTYPES, F32)
SOFT_INPUT_DTYPES = (FLOAT_DTYPES, FLOAT_DTYPES, F32)


def _forward_spec(symbol, soft, extra):
    """The spec of a forward kernel: per-row float32 outputs, then ``extra`` (None, "log_prob" or
    "argmax"): log_prob in the dtype of the input, argmax in the dtype of the class indices
    (int64 for probability targets)."""
    rows = SOFT_ROWS if soft else HARD_ROWS
    inputs = SOFT_INPUT_DTYPES if soft else HARD_INPUT_DTYPES
    ties = {1: 0} if soft else {}
    columns = list(inputs) + [F32] * len(rows)
    outputs = rows
    if extra == "log_prob":
        ties[len(columns)] = 0
        columns.append(FLOAT_DTYPES)
        outputs = rows + ("log_prob",)
    elif extra == "argmax":
        if not soft:
            ties[len(columns)] = 1
        columns.append(INDEX_DTYPES if not soft else I64)
        outputs = rows + ("argmax",)
    count = len(rows)

    def out_dtype(input_dtype, target_dtype, *rest):
        extra_dtypes = {None: (), "log_prob": (input_dtype,),
                        "argmax": (ms.int64 if soft else target_dtype,)}
        return (ms.float32,) * count + extra_dtypes[extra]

    return KernelSpec(symbol, ("input", "target", "weight"), outputs,
                      dtype_rows(*columns, tie=ties), out_dtype)


_SUFFIXES = {None: "", "log_prob": "LogProb", "argmax": "Argmax"}
FORWARD_SPECS = {
    (soft, extra): _forward_spec(("XentSoftForward" if soft else "XentHardForward") + suffix,
                                 soft, extra)
    for soft in (False, True) for extra, suffix in _SUFFIXES.items()}

_BACKWARD_INPUTS = ("input", "target", "weight", "shift_max", "shift_log_sum", "row_grad",
                    "row_grad_lse")
HARD_BACKWARD = KernelSpec(
    "XentHardBackward", _BACKWARD_INPUTS, ("grad",),
    dtype_rows(FLOAT_DTYPES, INDEX_DTYPES, F32, F32, F32, F32, F32, FLOAT_DTYPES, tie={7: 0}),
    lambda input_dtype, *rest: input_dtype)
SOFT_BACKWARD = KernelSpec(
    "XentSoftBackward", _BACKWARD_INPUTS, ("grad",),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, F32, F32, FLOAT_DTYPES,
               tie={1: 0, 7: 0}),
    lambda input_dtype, *rest: input_dtype)
SOFT_BACKWARD_TARGET = KernelSpec(
    "XentSoftBackwardTarget", _BACKWARD_INPUTS, ("grad", "grad_target"),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, F32, F32, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={1: 0, 7: 0, 8: 0}),
    lambda input_dtype, *rest: (input_dtype, input_dtype))


def cross_entropy_attrs(ignore_index, label_smoothing, weighted, logit_scale=1.0,
                        logit_softcap=0.0):
    """Kernel attributes shared by the forward and backward primitives."""
    return {"ignore_index": int(ignore_index), "label_smoothing": float(label_smoothing),
            "weighted": bool(weighted), "logit_scale": float(logit_scale),
            "logit_softcap": float(logit_softcap)}


class CrossEntropyBackward(AotPrimitive):
    """grad[N, C] (and for ``with_target`` the gradient w.r.t. probability targets) from per-row
    gradients; see the kernel header for the formulas."""

    def __init__(self, ignore_index=-100, label_smoothing=0.0, weighted=False, soft=False,
                 logit_scale=1.0, logit_softcap=0.0, with_target=False):
        spec = (SOFT_BACKWARD_TARGET if with_target else SOFT_BACKWARD) if soft else HARD_BACKWARD
        super().__init__(spec, cross_entropy_attrs(ignore_index, label_smoothing, weighted,
                                                   logit_scale, logit_softcap))


class CrossEntropyForward(AotPrimitive):
    """Per-row cross-entropy of logits; differentiable w.r.t. ``loss_rows`` and ``lse`` (and, for
    probability targets, w.r.t. the targets through ``loss_rows``).

    ``soft`` selects probability targets [N, C]; ``extra`` adds "log_prob" (only the public
    vendor-compatible op needs it; its gradient is not propagated) or "argmax" (no gradient).
    """

    def __init__(self, ignore_index=-100, label_smoothing=0.0, weighted=False, soft=False,
                 extra=None, logit_scale=1.0, logit_softcap=0.0):
        backward = CrossEntropyBackward(ignore_index, label_smoothing, weighted, soft,
                                        logit_scale, logit_softcap, with_target=soft)
        shift = (3, 4) if not soft else (2, 3)

        def bprop(logits, target, weight, out, dout):
            grads = backward(logits, target, weight, out[shift[0]], out[shift[1]], dout[0],
                             dout[1])
            if soft:
                return grads[0], grads[1], ops.zeros_like(weight)
            return grads, ops.zeros_like(target), ops.zeros_like(weight)

        super().__init__(FORWARD_SPECS[(bool(soft), extra)],
                         cross_entropy_attrs(ignore_index, label_smoothing, weighted, logit_scale,
                                             logit_softcap), bprop=bprop)
