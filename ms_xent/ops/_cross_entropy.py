"""Functional API of the fused cross-entropy (SPEC sections 1-3).

:func:`cross_entropy_loss` and :func:`cross_entropy_loss_grad` follow the vendor op
``npu_cross_entropy_loss`` / ``aclnnCrossEntropyLossGrad`` signatures, with every option usable
under autodiff. :func:`cross_entropy_rows` is the memory-lean building block the Cells use: per-row
float32 loss and lse only, no [N, C] output.
"""

import mindspore as ms
from mindspore import ops

from ms_xent.ops import backend
from ms_xent.ops.aot_primitive import cached_primitive
from ms_xent.ops.cross_entropy_op import CrossEntropyBackward, CrossEntropyForward
from ms_xent.ops.validation import (check_ignore_index, check_logits_and_target,
                                    check_option_values, check_target_values, check_weight,
                                    check_weight_values, executing_eagerly)


def _class_weight(api, weight, n_classes):
    """(weight as float32 [C], weighted flag); all ones when ``weight`` is None."""
    if weight is None:
        return ops.ones((n_classes,), ms.float32), False
    check_weight(api, weight.shape, weight.dtype, n_classes)
    if executing_eagerly():
        check_weight_values(api, weight)
    return weight.astype(ms.float32), True


def _validate(api, logits, target, ignore_index, logits_name="input"):
    """Static checks; eager value checks. Returns True for probability targets."""
    soft = check_logits_and_target(api, logits.shape, logits.dtype, target.shape, target.dtype,
                                   logits_name)
    check_ignore_index(api, ignore_index)
    if not soft and executing_eagerly():
        check_target_values(api, target, logits.shape[1], ignore_index)
    return soft


def _safe_divide(numerator, denominator):
    """numerator / denominator, and 0 where the denominator is 0 (every row ignored)."""
    positive = denominator > 0
    return ops.select(positive, numerator / ops.select(positive, denominator,
                                                       ops.ones_like(denominator)),
                      ops.zeros_like(numerator))


def _counted_lse(mask, lse):
    """``lse`` on counted rows and exactly 0 on ignored ones, whatever their logits hold.

    An ignored row of -inf (or NaN) logits has lse = -inf (NaN): ``mask * lse^2`` would be
    0 * inf = NaN in the z-loss and in its gradient (selecting after squaring still sends
    0 * lse back). Selecting lse itself keeps both exactly 0.
    """
    return ops.select(mask > 0, lse, ops.zeros_like(lse))


def sum_rows(rows):
    """Sum of a [N] float32 vector that is also correct for N = 0.

    MindSpore 2.9's CPU ReduceSum leaves its output uninitialised for an empty input (it returned
    1.4e23 here), so a zero is prepended.
    """
    return ops.cat((ops.zeros((1,), rows.dtype), rows)).sum()


def _reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = sum_rows(rows)
    if reduction == "sum":
        return total
    return _safe_divide(total, denominator)


def row_mask(target, ignore_index, soft):
    """1.0 for rows that count, 0.0 for ignored rows, float32 [N].

    Compared in int64: MindSpore converts a Python int to the tensor's dtype, so an int32 target
    compared with ignore_index = 2**40 would see 0 (wrapped) and ignore the rows of class 0.
    """
    if soft:
        return ops.ones((target.shape[0],), ms.float32)
    return (target.astype(ms.int64) != ignore_index).astype(ms.float32)


def cross_entropy_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                       api="cross_entropy_rows"):
    """Per-row cross-entropy without any [N, C] output; the training building block.

    Args:
        logits: [N, C] float16/bfloat16/float32.
        target: [N] int32/int64 class indices, or [N, C] float class probabilities.
        weight, ignore_index, label_smoothing: as in :func:`cross_entropy_loss`.

    Returns:
        (loss_rows, lse, row_weight), float32 [N] each: l_n, log-sum-exp of the row, and the
        row's share of the mean denominator (w[y_n] or 0 if ignored; 1 for probability targets).
        Differentiable w.r.t. ``logits`` through ``loss_rows`` and ``lse``; the backward recomputes
        the softmax from ``logits``.
    """
    check_option_values(api, "mean", label_smoothing, 0.0)
    soft = _validate(api, logits, target, ignore_index)
    weight_f32, weighted = _class_weight(api, weight, logits.shape[1])
    if not backend.uses_cpu_kernels():  # off CPU: ms_xent.ops.backend chooses the implementation
        return backend.cross_entropy_rows(logits, target, weight_f32 if weighted else None,
                                          ignore_index, label_smoothing, soft)
    forward = cached_primitive(CrossEntropyForward, ignore_index, label_smoothing, weighted, soft,
                               False)
    if soft:
        loss_rows, lse = forward(logits, target.astype(logits.dtype), weight_f32)
        return loss_rows, lse, ops.ones_like(lse)
    return forward(logits, target, weight_f32)


def cross_entropy_loss(input, target, weight=None, reduction="mean", ignore_index=-100,  # pylint: disable=redefined-builtin
                       label_smoothing=0.0, lse_square_scale_for_zloss=0.0, return_zloss=False):
    """Fused log_softmax + nll_loss, with class weights, ignore_index, label smoothing and z-loss.

    Args:
        input: [N, C] logits, float16 / bfloat16 / float32 (accumulated in float32).
        target: [N] int32/int64 class indices in [0, C) or equal to ``ignore_index``; or [N, C]
            float class probabilities (then ``ignore_index`` does not apply and "mean" divides by N).
        weight: optional [C] non-negative class weights.
        reduction: "mean" (sum of l_n over sum of w[y_n] of non-ignored rows), "sum" or "none".
        ignore_index: rows with this target contribute no loss and get zero gradient.
        label_smoothing: eps in [0, 1); the target mixes with the uniform distribution.
        lse_square_scale_for_zloss: s in [0, 1); z_n = s * lse_n^2 on non-ignored rows.
        return_zloss: return the z-loss (reduced like the loss; "mean" divides by the number of
            non-ignored rows). The z-loss is a separate output and is not added to ``loss``.

    Returns:
        (loss, log_prob, zloss, lse_for_zloss):
        ``loss`` in the dtype of ``input``, 0-d for "mean"/"sum", [N] for "none". With "mean" and
        every row ignored the result is 0 (not NaN) and the gradient is 0.
        ``log_prob`` [N, C] in the dtype of ``input`` (not differentiable).
        ``zloss`` like ``loss``, or a zero-size tensor when ``return_zloss`` is False.
        ``lse_for_zloss`` [N] float32, or zero-size when ``lse_square_scale_for_zloss`` is 0.
        ``loss`` and ``zloss`` are differentiable w.r.t. ``input``.
    """
    api = "cross_entropy_loss"
    check_option_values(api, reduction, label_smoothing, lse_square_scale_for_zloss)
    soft = _validate(api, input, target, ignore_index)
    weight_f32, weighted = _class_weight(api, weight, input.shape[1])
    if not backend.uses_cpu_kernels():  # off CPU: ms_xent.ops.backend chooses the implementation
        return backend.cross_entropy_loss(input, target, weight_f32 if weighted else None,
                                          reduction, ignore_index, label_smoothing,
                                          lse_square_scale_for_zloss, return_zloss, soft)
    forward = cached_primitive(CrossEntropyForward, ignore_index, label_smoothing, weighted, soft,
                               True)
    if soft:
        loss_rows, lse, log_prob = forward(input, target.astype(input.dtype), weight_f32)
        denominator = sum_rows(ops.ones_like(lse))
    else:
        loss_rows, lse, row_weight, log_prob = forward(input, target, weight_f32)
        denominator = sum_rows(row_weight)
    loss = _reduce(loss_rows, reduction, denominator).astype(input.dtype)

    zloss = ops.zeros((0,), input.dtype)
    if return_zloss:
        mask = row_mask(target, ignore_index, soft)
        counted_lse = _counted_lse(mask, lse)
        z_rows = lse_square_scale_for_zloss * counted_lse * counted_lse
        zloss = _reduce(z_rows, reduction, sum_rows(mask)).astype(input.dtype)
    lse_for_zloss = lse if lse_square_scale_for_zloss > 0 else ops.zeros((0,), ms.float32)
    return loss, log_prob, zloss, lse_for_zloss


def _per_row(grad, reduction, rows_like):
    """Broadcasts a 0-d upstream gradient to [N] float32 ("none" passes it through)."""
    grad = grad.astype(ms.float32)
    if reduction == "none":
        return grad
    return grad.reshape(()) * ops.ones_like(rows_like)


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight=None, grad_zloss=None,
                            lse_for_zloss=None, reduction="mean", ignore_index=-100,
                            label_smoothing=0.0, lse_square_scale_for_zloss=0.0):
    """Gradient of :func:`cross_entropy_loss` w.r.t. ``input``, from its ``log_prob`` output.

    ``grad_loss`` is 0-d for "mean"/"sum" and [N] for "none"; ``grad_zloss`` likewise (optional).
    The z-loss term needs ``lse_for_zloss`` from the forward. Returns grad_input [N, C] in the
    dtype of ``log_prob``; rows whose target is ``ignore_index`` get exact zeros.
    """
    api = "cross_entropy_loss_grad"
    check_option_values(api, reduction, label_smoothing, lse_square_scale_for_zloss)
    soft = _validate(api, log_prob, target, ignore_index, "log_prob")
    weight_f32, weighted = _class_weight(api, weight, log_prob.shape[1])
    if not backend.uses_cpu_kernels():  # off CPU: ms_xent.ops.backend chooses the implementation
        return backend.cross_entropy_loss_grad(grad_loss, log_prob, target,
                                               weight_f32 if weighted else None, grad_zloss,
                                               lse_for_zloss, reduction, ignore_index,
                                               label_smoothing, lse_square_scale_for_zloss, soft)
    mask = row_mask(target, ignore_index, soft)

    if soft:
        denominator = sum_rows(mask)
    else:
        safe_target = ops.select(mask > 0, target, ops.zeros_like(target))
        denominator = sum_rows(ops.gather(weight_f32, safe_target, 0) * mask)
    row_grad = _per_row(grad_loss, reduction, mask)
    if reduction == "mean":
        row_grad = _safe_divide(row_grad, denominator)

    row_grad_lse = ops.zeros_like(mask)
    if grad_zloss is not None and lse_for_zloss is not None and lse_square_scale_for_zloss > 0:
        # z_n = m_n s lse_n^2  =>  dz_n / dlse_n = 2 s lse_n m_n
        z_grad = _per_row(grad_zloss, reduction, mask)
        if reduction == "mean":
            z_grad = _safe_divide(z_grad, sum_rows(mask))
        row_grad_lse = z_grad * 2.0 * lse_square_scale_for_zloss * _counted_lse(mask,
                                                                                lse_for_zloss)

    backward = cached_primitive(CrossEntropyBackward, ignore_index, label_smoothing, weighted, soft)
    if soft:
        target = target.astype(log_prob.dtype)
    return backward(log_prob, target, weight_f32, ops.zeros_like(mask), row_grad, row_grad_lse)
