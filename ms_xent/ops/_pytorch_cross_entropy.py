"""``ms_xent.ops.cross_entropy``: PyTorch's ``F.cross_entropy`` signature, shapes and semantics on
the fused per-row kernels, so that PyTorch code ports by changing the import.

Layouts: the class axis is dim 1 of ``input``; (C,) unbatched, (N, C), or (N, C, d1, ..., dk).
The kernels read [rows, C] with the classes contiguous, so the K-dimensional layout is moved to
(N, d1, ..., dk, C) first: ONE transpose copy of the logits (N d1..dk C elements in the input's
dtype) in the forward, and one of their gradient in the backward (the transpose's own gradient);
probability targets of that layout are transposed too (one more copy each way). (C,) and (N, C)
make no copy. bfloat16 in GRAPH mode relays out through float32 (MindSpore's CPU Transpose and
Reshape have no bfloat16 kernel there): one transient float32 copy more, see
:func:`ms_xent._backends._mindspore.relaid_out`. Nothing else [N, C] is allocated: the loss comes from
:func:`ms_xent.ops.cross_entropy_rows`' per-row float32 values, the backward recomputes the
softmax from the logits.
"""

import mindspore as ms
from mindspore import ops
from mindspore.ops import constexpr

from ms_xent._backends import dispatch
from ms_xent._backends._mindspore import relaid_out, total
from ms_xent._backends._reductions import mean_weight, reduce_rows
from ms_xent.ops.validation import (FLOAT_TYPES, INDEX_TYPES, check_option_values, class_weight,
                                    validate_logits_and_target)

API = "cross_entropy"


@constexpr
def _class_axis_layout(input_shape, input_dtype, target_shape, target_dtype):
    """Checks PyTorch's layout rules; returns the rank of ``input`` (1: unbatched (C,))."""
    if input_dtype not in FLOAT_TYPES:
        raise TypeError(f"{API}: `input` must be float16, bfloat16 or float32, got {input_dtype}")
    shape, target = tuple(input_shape), tuple(target_shape)
    if len(shape) == 0:
        raise ValueError(f"{API}: `input` must be (C,), (N, C) or (N, C, d1, ..., dk) with the "
                         f"classes at dim 1, got a 0-d tensor")
    if target_dtype in FLOAT_TYPES:
        if target != shape:
            raise ValueError(f"{API}: probability `target` must have the shape of `input` "
                             f"{shape}, got {target}")
        return len(shape)
    if target_dtype not in INDEX_TYPES:
        raise TypeError(f"{API}: `target` must be int32 / int64 class indices or float "
                        f"probabilities, got {target_dtype}")
    expected = () if len(shape) == 1 else shape[:1] + shape[2:]
    if target != expected:
        raise ValueError(f"{API}: class-index `target` for `input` of shape {shape} (classes at "
                         f"dim {0 if len(shape) == 1 else 1}) must have shape {expected}, got "
                         f"{target}")
    return len(shape)


def _classes_last(tensor, rank):
    """[rows, C] from (C,), (N, C) or (N, C, d1, ..., dk) (the latter by a transpose copy)."""
    if rank == 1:
        return relaid_out(tensor, lambda t: t.reshape((1, -1)))
    if rank == 2:
        return tensor
    order = (0,) + tuple(range(2, rank)) + (1,)
    return relaid_out(tensor, lambda t: ops.transpose(t, order).reshape((-1, t.shape[1])))


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",  # pylint: disable=redefined-builtin
                  label_smoothing=0.0):
    """``torch.nn.functional.cross_entropy`` on the fused kernels (same signature and semantics).

    Args:
        input: logits with the classes at dim 1: (C,), (N, C) or (N, C, d1, ..., dk); float16,
            bfloat16 or float32 (accumulated in float32).
        target: int32 / int64 class indices of shape (), (N) or (N, d1, ..., dk), in [0, C) or
            equal to ``ignore_index``; or float class probabilities of the shape of ``input``
            (``ignore_index`` does not apply, "mean" divides by the number of rows).
        weight: optional [C] finite class weights (any sign).
        ignore_index: class-index target value whose positions count for nothing.
        reduction: "mean" (sum of losses over the sum of w[y] of the counted positions), "sum"
            or "none" (the shape of a class-index target).
        label_smoothing: eps in [0, 1): the target mixes with the uniform distribution.

    Returns:
        The loss in the dtype of ``input``; differentiable w.r.t. ``input`` and w.r.t.
        probability targets.

    One difference from PyTorch, deliberate: "mean" over positions whose weights sum to exactly
    0 (e.g. every target ignored) returns 0 with zero gradient, where PyTorch returns NaN.

    Memory: (C,) and (N, C) make no copy; (N, C, d1, ..., dk) makes one transpose copy of the
    logits (and of probability targets) to move the classes last, and one of the gradient.
    """
    check_option_values(API, reduction, label_smoothing, 0.0)
    rank = _class_axis_layout(input.shape, input.dtype, target.shape, target.dtype)
    logits = _classes_last(input, rank)
    soft = target.dtype in FLOAT_TYPES
    rows_target = _classes_last(target, rank) if soft else target.reshape((-1,))
    validate_logits_and_target(API, logits, rows_target, ignore_index)
    weight = class_weight(API, weight, logits.shape[1])
    if reduction == "mean" and weight is not None and not soft:
        # The rows on w / D sum to the mean (see mean_weight): no 1 / D in the gradient.
        scaled, nonzero = mean_weight(weight, rows_target, ignore_index)
        loss_rows, _, _ = dispatch.cross_entropy_rows(logits, rows_target, scaled, ignore_index,
                                                      label_smoothing, soft)
        loss = ops.select(nonzero, total(loss_rows), ops.zeros((), ms.float32))
    else:
        loss_rows, _, shares = dispatch.cross_entropy_rows(logits, rows_target, weight,
                                                           ignore_index, label_smoothing, soft)
        loss = reduce_rows(loss_rows, reduction, total(shares))
    if reduction == "none" and rank != 2:
        loss = loss.reshape(input.shape[:1] + input.shape[2:] if rank > 2 else ())
    return loss.astype(input.dtype)
