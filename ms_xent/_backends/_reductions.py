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


def loss_and_zloss(loss_rows, lse, shares, mean_nonzero, input, target, reduction, ignore_index,  # pylint: disable=redefined-builtin
                   lse_square_scale_for_zloss, return_zloss, soft):
    """The (loss, zloss, lse_for_zloss) outputs of ``cross_entropy_loss`` from per-row values.

    loss: ``loss_rows`` reduced ("mean" divides by the sum of ``shares``; with class weights the
    rows were computed with w / D (:func:`mean_weight`) and ``mean_nonzero`` is given: the mean is
    their sum, 0 when D = 0). zloss: z_n = m_n s lse_n^2, unweighted, "mean" over the counted rows
    (zero-size unless ``return_zloss``). lse_for_zloss: lse, zero-size when s = 0.
    """
    if mean_nonzero is None:
        loss = reduce_rows(loss_rows, reduction, total(shares))
    else:
        loss = ops.select(mean_nonzero, total(loss_rows), ops.zeros((), ms.float32))
    zloss = ops.zeros((0,), input.dtype)
    if return_zloss:
        counted = ops.ones_like(lse, dtype=ms.bool_) if soft else counted_rows(target,
                                                                               ignore_index)
        kept_lse = counted_lse(counted, lse)
        z_rows = lse_square_scale_for_zloss * kept_lse * kept_lse
        zloss = reduce_rows(z_rows, reduction, total(counted.astype(ms.float32))).astype(
            input.dtype)
    lse_for_zloss = lse if lse_square_scale_for_zloss > 0 else ops.zeros((0,), ms.float32)
    return loss.astype(input.dtype), zloss, lse_for_zloss
