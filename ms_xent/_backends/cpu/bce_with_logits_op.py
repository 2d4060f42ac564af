"""Op layer of the fused binary cross-entropy with logits: aot primitives and their bprop.

=================================  ============================================  =============
primitive                          inputs                                        outputs
=================================  ============================================  =============
``BceWithLogitsForward(False)``    input, target (same shape, dtype T),          loss (like
                                   weight, pos_weight (float32, broadcastable)   input, T)
``BceWithLogitsForward(True)``     same                                          loss_sum
                                                                                 (float32 [1])
``BceWithLogitsBackward(True)``    same + grad_loss (like input, T)              grad_input,
                                                                                 grad_target (T)
``BceWithLogitsBackward(False)``   same + grad_loss (float32 [1])                same
=================================  ============================================  =============

The formulas, their derivation and the handling of infinite logits are in the header of
``ms_xent/csrc/bce_kernel.cc``. The summing forward accumulates in float32 per segment and in
float64 across segments, so a "mean"/"sum" of bfloat16 losses is as accurate as in float32; its
bprop receives the float32 gradient of that sum, not one rounded to T.

Broadcasting of ``weight`` and ``pos_weight``: they are passed in their own shapes, and the kernel
derives their strides from the shapes MindSpore hands it at run time (right-aligned, stride 0 on
size-1 dims; dims that are contiguous for every operand are merged first, so the inner loop sees
stride 0 or 1 and vectorises). The alternative, ``ops.broadcast_to`` in Python, is simpler but
materialises two float32 tensors the size of ``input`` in the forward and keeps them alive for the
backward (e.g. +2 x 4 bytes per element next to a bfloat16 input of 2 bytes per element); a
per-class ``pos_weight`` [C] would cost N*C floats instead of C. Computing strides in the kernel
costs no memory, and since the shapes come from the kernel call itself it also works with
dynamic shapes in GRAPH_MODE.

``weight`` and ``pos_weight`` are not differentiable (PyTorch refuses gradients for them too);
their bprop is zero.
"""

import mindspore as ms
from mindspore import ops

from ms_xent._backends.cpu.aot_primitive import (FLOAT_DTYPES, AotPrimitive, KernelSpec,
                                                 dtype_rows)

F32 = ("float32",)
_INPUTS = ("input", "target", "weight", "pos_weight")
_GRADS = ("grad_input", "grad_target")


def _same_as_input(input_dtype, *rest):
    return input_dtype


def _float32(*dtypes):
    return ms.float32


def _two_like_input(input_dtype, *rest):
    return input_dtype, input_dtype


FORWARD = KernelSpec(
    "BceWithLogitsForward", _INPUTS, ("loss",),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, FLOAT_DTYPES, tie={1: 0, 4: 0}),
    _same_as_input)
FORWARD_SUM = KernelSpec(
    "BceWithLogitsForwardSum", _INPUTS, ("loss_sum",),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, tie={1: 0}), _float32)
BACKWARD = KernelSpec(
    "BceWithLogitsBackward", _INPUTS + ("grad_loss",), _GRADS,
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={1: 0, 4: 0, 5: 0, 6: 0}),
    _two_like_input)
BACKWARD_SCALAR_GRAD = KernelSpec(
    "BceWithLogitsBackwardScalarGrad", _INPUTS + ("grad_loss",), _GRADS,
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, F32, F32, F32, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={1: 0, 5: 0, 6: 0}),
    _two_like_input)


class BceWithLogitsBackward(AotPrimitive):
    """(grad_input, grad_target) from the upstream gradient of the loss.

    ``element_grad``: the upstream gradient has the shape and dtype of ``input`` (reduction
    "none"); otherwise it is the float32 [1] gradient of the summed loss.
    """

    def __init__(self, element_grad):
        super().__init__(BACKWARD if element_grad else BACKWARD_SCALAR_GRAD, {})


class BceWithLogitsForward(AotPrimitive):
    """Element-wise losses (``reduce_sum=False``) or their float32 sum [1] (``reduce_sum=True``).

    Differentiable w.r.t. ``input`` and ``target``.
    """

    def __init__(self, reduce_sum):
        backward = BceWithLogitsBackward(not reduce_sum)

        def bprop(logits, target, weight, pos_weight, out, dout):
            grad_input, grad_target = backward(logits, target, weight, pos_weight, dout)
            return grad_input, grad_target, ops.zeros_like(weight), ops.zeros_like(pos_weight)

        super().__init__(FORWARD_SUM if reduce_sum else FORWARD, {}, bprop=bprop)
