"""The reductions and upstream-gradient broadcasts every backend applies to its per-row values."""

import mindspore as ms
from mindspore import ops

from ms_xent._backends._mindspore import counted_rows, safe_divide, total


def reduce_rows(rows, reduction, denominator):
    """"none" -> rows [N], "sum" -> 0-d total, "mean" -> total / denominator (0 if it is 0)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return total(rows)
    return safe_divide(total(rows), denominator)


def upstream_per_row(grad, reduction, denominator, rows_like):
    """The upstream gradient as float32 [N]: g_n ("none"), g ("sum"), g / D ("mean", 0 if D = 0;
    ``denominator`` is not read for the other reductions)."""
    grad = grad.astype(ms.float32)
    if reduction == "none":
        return grad
    per_row = grad.reshape(()) * ops.ones_like(rows_like)
    if reduction == "sum":
        return per_row
    return safe_divide(per_row, denominator)


def counted_lse(counted, lse):
    """``lse`` on counted rows and exactly 0 on the others, whatever their logits hold.

    An ignored row of -inf (or NaN) logits has lse = -inf (NaN): ``mask * lse^2`` would be
    0 * inf = NaN in the z-loss and in its gradient (selecting after squaring still sends
    0 * lse back). Selecting lse itself keeps both exactly 0.
    """
    return ops.select(counted, lse, ops.zeros_like(lse))


def mean_weight(weight, target, ignore_index):
    """(w / D as float32 [C], D != 0 as a bool 0-d tensor) for "mean" with class weights, where
    D = sum of w[y_n] over the counted rows (any sign).

    The loss is then the plain sum of the rows computed with w / D: neither the sum of the rows
    nor D is formed in float32 (weights of 1e37 would overflow both) and the gradient never forms
    1 / D (denormal weights would overflow it). D and w / D are computed in float64; with D = 0
    the weights are 0 (the loss and its gradient are then 0).
    """
    counted = counted_rows(target, ignore_index)
    safe_target = ops.select(counted, target, ops.zeros_like(target))
    weight64 = weight.astype(ms.float64)
    denominator = total(ops.gather(weight64, safe_target, 0) * counted.astype(ms.float64))
    nonzero = denominator != 0
    safe = ops.select(nonzero, denominator, ops.ones_like(denominator))
    scaled = ops.select(nonzero, weight64 / safe, ops.zeros_like(weight64))
    return scaled.astype(ms.float32), nonzero
