"""The CPU backend: ms_xent's fused C++ kernels (aot ``ops.Custom`` primitives) behind the backend
contract of :mod:`ms_xent._backends.dispatch`.

Arguments arrive validated; ``weight`` is float32 [C] or None. The primitives' bprops recompute
the softmax from the logits and the per-row shift, so nothing [N, C] is kept for the backward.
"""

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from ms_xent._backends._mindspore import cached_primitive, counted_rows, total
from ms_xent._backends._reductions import (counted_lse, loss_and_zloss, mean_weight,
                                           upstream_per_row)
from ms_xent._backends.cpu.bce_with_logits_op import BceWithLogitsForward
from ms_xent._backends.cpu.cross_entropy_op import CrossEntropyBackward, CrossEntropyForward

F32 = ms.float32
# The BCE kernel's broadcasting layout holds at most this many dims (kMaxRank in bce_kernel.cc).
BCE_MAX_RANK = 16


@constexpr
def check_kernel_rank(input_shape):
    """A clear error for inputs of more dims than the BCE kernel's layout holds (a dynamic rank
    is checked by the kernel at run time)."""
    if input_shape is not None and len(input_shape) > BCE_MAX_RANK:
        raise ValueError(f"binary_cross_entropy_with_logits: `input` has {len(input_shape)} dims; "
                         f"the CPU kernel takes at most {BCE_MAX_RANK} (merge some dims first)")
    return True


def _kernel_weight(weight, n_classes):
    """(float32 [C] weight for the kernels, weighted flag): ones when there is none."""
    if weight is None:
        return ops.ones((n_classes,), F32), False
    return weight, True


def cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, soft,
                       logit_scale=1.0, logit_softcap=0.0, return_argmax=False):
    """float32 (loss_rows, lse, row_weight) [N], differentiable through loss_rows and lse (and the
    probability targets through loss_rows); with ``return_argmax`` also the row's argmax [N]
    (dtype of the class indices; int64 for probability targets)."""
    weight, weighted = _kernel_weight(weight, logits.shape[1])
    forward = cached_primitive(CrossEntropyForward, ignore_index, label_smoothing, weighted, soft,
                               "argmax" if return_argmax else None, logit_scale, logit_softcap)
    if soft:
        outputs = forward(logits, target.astype(logits.dtype), weight)
        rows = (outputs[0], outputs[1], ops.ones_like(outputs[1]))
    else:
        outputs = forward(logits, target, weight)
        rows = (outputs[0], outputs[1], outputs[2])
    return rows + (outputs[-1],) if return_argmax else rows


def cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing,  # pylint: disable=redefined-builtin
                       lse_square_scale_for_zloss, return_zloss, soft, logit_scale=1.0,
                       logit_softcap=0.0):
    """:func:`ms_xent.ops.cross_entropy_loss` by the forward kernel that also writes log_prob.

    "mean" with class weights runs the kernel on w / D (:func:`mean_weight`), so that the loss is
    the plain sum of the rows and its gradient never forms 1 / D."""
    mean_nonzero = None
    if weight is not None and reduction == "mean" and not soft:
        weight, mean_nonzero = mean_weight(weight, target, ignore_index)
    weight, weighted = _kernel_weight(weight, input.shape[1])
    forward = cached_primitive(CrossEntropyForward, ignore_index, label_smoothing, weighted, soft,
                               "log_prob", logit_scale, logit_softcap)
    if soft:
        loss_rows, lse, _, _, log_prob = forward(input, target.astype(input.dtype), weight)
        shares = ops.ones_like(lse)
    else:
        loss_rows, lse, shares, _, _, log_prob = forward(input, target, weight)
    loss, zloss, lse_for_zloss = loss_and_zloss(
        loss_rows, lse, shares, mean_nonzero, input, target, reduction, ignore_index,
        lse_square_scale_for_zloss, return_zloss, soft)
    return loss, log_prob, zloss, lse_for_zloss


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss,
                            reduction, ignore_index, label_smoothing, lse_square_scale_for_zloss,
                            soft):
    """:func:`ms_xent.ops.cross_entropy_loss_grad` by the backward kernel with shift (0, 0)."""
    if soft:
        counted = ops.ones((log_prob.shape[0],), ms.bool_)
    else:
        counted = counted_rows(target, ignore_index)
    mask = counted.astype(F32)
    if weight is not None and reduction == "mean" and not soft:
        weight, _ = mean_weight(weight, target, ignore_index)
        row_grad = upstream_per_row(grad_loss, "sum", None, mask)
    else:
        denominator = total(mask) if weight is None or soft else total(
            ops.gather(weight, ops.select(counted, target, ops.zeros_like(target)), 0) * mask)
        row_grad = upstream_per_row(grad_loss, reduction, denominator, mask)
    weight, weighted = _kernel_weight(weight, log_prob.shape[1])

    row_grad_lse = ops.zeros_like(mask)
    if grad_zloss is not None and lse_for_zloss is not None and lse_square_scale_for_zloss > 0:
        # z_n = m_n s lse_n^2  =>  dz_n / dlse_n = 2 s lse_n m_n
        z_grad = upstream_per_row(grad_zloss, reduction, total(mask), mask)
        row_grad_lse = z_grad * 2.0 * lse_square_scale_for_zloss * counted_lse(counted,
                                                                               lse_for_zloss)

    backward = cached_primitive(CrossEntropyBackward, ignore_index, label_smoothing, weighted, soft)
    if soft:
        target = target.astype(log_prob.dtype)
    no_shift = ops.zeros_like(mask)
    return backward(log_prob, target, weight, no_shift, no_shift, row_grad, row_grad_lse)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction):  # pylint: disable=redefined-builtin
    """BCE with logits; ``weight`` / ``pos_weight`` float32 in their own shapes (0-d ones when
    absent: the kernel broadcasts them)."""
    check_kernel_rank(input.shape)
    weight = ops.ones((), F32) if weight is None else weight
    pos_weight = ops.ones((), F32) if pos_weight is None else pos_weight
    if reduction == "none":
        return cached_primitive(BceWithLogitsForward, False)(input, target, weight, pos_weight)
    loss_sum = cached_primitive(BceWithLogitsForward, True)(input, target, weight, pos_weight)
    loss_sum = loss_sum.reshape(())
    if reduction == "mean":
        loss_sum = loss_sum / ops.size(input)
    return loss_sum.astype(input.dtype)


class RowKernels(nn.Cell):
    """The per-row pieces that callers with their own bprop combine (vocabulary-parallel rows,
    the row-chunked linear + cross-entropy); not differentiable themselves.

    ``forward(logits, target, weight)`` -> (loss_rows, lse, row_weight, shift): ``shift`` is this
    backend's per-row state for the backward, a pair (row_max, log_sum) of float32 [N] with
    lse = row_max + log_sum (the kernels' split log-sum-exp).
    ``backward(logits, target, weight, shift, row_grad, row_grad_lse)`` -> grad [N, C] in the
    dtype of the logits: row_grad * dl_n/dx + row_grad_lse * softmax(x), zero rows where both are
    0 (and row_grad is ignored on ignored rows). ``weight`` is float32 [C] (ones when
    ``weighted`` is False); probability targets come in the dtype of the logits.
    """

    def __init__(self, ignore_index, label_smoothing, weighted, soft):
        super().__init__()
        self.soft = soft
        self.rows_forward = CrossEntropyForward(ignore_index, label_smoothing, weighted, soft)
        self.rows_backward = CrossEntropyBackward(ignore_index, label_smoothing, weighted, soft)
        # See composed.RowKernels: no composite zeros_like inside a Cell with a bprop.
        self.zeros_like = ops.ZerosLike()

    def forward(self, logits, target, weight):
        outputs = self.rows_forward(logits, target, weight)
        lse = outputs[1]
        if self.soft:
            return outputs[0], lse, ops.ones_like(lse), (outputs[2], outputs[3])
        return outputs[0], lse, outputs[2], (outputs[3], outputs[4])

    def backward(self, logits, target, weight, shift, row_grad, row_grad_lse):
        return self.rows_backward(logits, target, weight, shift[0], shift[1], row_grad,
                                  row_grad_lse)
