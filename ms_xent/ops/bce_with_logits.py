"""Functional API of the fused binary cross-entropy with logits (docs/semantics.md)."""

import mindspore as ms

from ms_xent._backends import dispatch
from ms_xent._backends._mindspore import executing_eagerly
from ms_xent.ops.validation import (bce_reduction, check_bce_input_and_target,
                                    check_broadcastable_to, check_non_negative_values,
                                    check_tensors)

API = "binary_cross_entropy_with_logits"


def _factor(name, value, target_shape):
    """``weight`` / ``pos_weight`` as float32 in its own shape (the backends broadcast it), or
    None."""
    if value is None:
        return None
    if not isinstance(value, ms.Tensor):
        raise TypeError(f"{API}: `{name}` must be a Tensor or None, got {type(value).__name__}")
    check_broadcastable_to(API, name, value.shape, value.dtype, target_shape)
    if executing_eagerly():
        check_non_negative_values(API, name, value)
    return value.astype(ms.float32)


def binary_cross_entropy_with_logits(  # pylint: disable=redefined-builtin
        input, target, weight=None, pos_weight=None, reduction="mean"):
    """Binary cross-entropy of logits, fused (sigmoid + log + weighting + reduction in one kernel).

    Per element, l = -w * (pw * t * log(sigmoid(x)) + (1 - t) * log(1 - sigmoid(x))), evaluated
    as w * (pw * t * softplus(-x) + (1 - t) * softplus(x)): finite for every finite logit (no
    log(sigmoid) underflow at x = -120 with ``pos_weight``) and without cancellation for
    t in [0, 1]. Same values as PyTorch's ``F.binary_cross_entropy_with_logits``, including at
    non-finite logits: x = +inf gives inf (NaN when t = 1), x = -inf gives NaN, NaN propagates.

    Args:
        input: logits x of any shape, float16 / bfloat16 / float32 (computed in float32).
        target: t, a float tensor of the shape of ``input`` with values in [0, 1] (soft targets
            allowed). Read in the dtype of ``input`` (cast if it differs); its gradient is
            returned in its own dtype.
        weight: optional non-negative rescaling w of each element (default None: 1), any shape that
            broadcasts to ``target`` (right-aligned dims, each 1 or equal).
        pos_weight: optional non-negative weight pw of the positive term (default None: 1), any
            shape that broadcasts to ``target``; a [C] tensor weighs the classes of the last dim, as
            in PyTorch.
        reduction: "mean" (the default: sum over the number of elements), "sum" or "none"; or the
            vendor op's integer codes 0 (none), 1 (mean), 2 (sum).

    Returns:
        The loss in the dtype of ``input``: the shape of ``input`` for "none", 0-d otherwise. The
        sum behind "mean"/"sum" accumulates in float32 (float64 across chunks) and is rounded to
        the dtype of ``input`` once. For an empty ``input``, "sum" is 0 and "mean" is NaN (0/0),
        as in PyTorch. Differentiable w.r.t. ``input`` and ``target`` (fused backward kernel);
        ``weight`` and ``pos_weight`` get zero gradient (PyTorch does not differentiate them).

    Raises:
        TypeError: non-float ``input``/``target``/``weight``/``pos_weight``, or a ``weight`` /
            ``pos_weight`` that is not a Tensor.
        ValueError: ``target`` of another shape than ``input``; ``weight`` / ``pos_weight`` not
            broadcastable to it, or (eagerly) with a negative entry; unknown ``reduction``.
    """
    reduction = bce_reduction(API, reduction)
    if executing_eagerly():
        check_tensors(API, ("input", "target"), (input, target))
    check_bce_input_and_target(API, input.shape, input.dtype, target.shape, target.dtype)
    weight = _factor("weight", weight, target.shape)
    pos_weight = _factor("pos_weight", pos_weight, target.shape)
    if target.dtype != input.dtype:
        target = target.astype(input.dtype)
    return dispatch.binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction)
