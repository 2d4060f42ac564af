"""The reductions and upstream-gradient broadcasts every backend applies to its per-row values."""

import mindspore as ms
from mindspore import ops

from ms_xent._backends._mindspore import safe_divide, total


def reduce_rows(rows, reduction, denominator):
    """"none" -> rows [N], "sum" -> 0-d total, "mean" -> total / denominator (0 if it is 0)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return total(rows)
    return safe_divide(total(rows), denominator)


def upstream_per_row(grad, reduction, denominator, rows_like):
    """The upstream gradient as float32 [N]: g_n ("none"), g ("sum"), g / D ("mean", 0 if D = 0)."""
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
