"""Functional API of the fused cross-entropy (docs/semantics.md).

:func:`cross_entropy_loss` and :func:`cross_entropy_loss_grad` follow the vendor op
``npu_cross_entropy_loss`` / ``aclnnCrossEntropyLossGrad`` signatures, with every option usable
under autodiff. :func:`cross_entropy_rows` is the memory-lean building block the Cells use: per-row
float32 loss and lse only, no [N, C] output.
"""

from ms_xent._backends import dispatch
from ms_xent.ops.validation import (check_logit_map, check_option_values, class_weight,
                                    validate_logits_and_target)


def cross_entropy_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                       logit_scale=1.0, logit_softcap=0.0, return_argmax=False):
    """Per-row cross-entropy without any [N, C] output; the training building block.

    Args:
        logits: [N, C] float16/bfloat16/float32.
        target: [N] int32/int64 class indices, or [N, C] float class probabilities.
        weight: optional [C] finite class weights (default None: all 1), as in
            :func:`cross_entropy_loss`.
        ignore_index: int, default -100; rows with this class-index target get loss 0, row
            weight 0 and zero gradient.
        label_smoothing: float eps in [0, 1), default 0.0.
        logit_scale: float != 0, default 1.0, as in :func:`cross_entropy_loss`.
        logit_softcap: float >= 0, default 0.0 (no cap), as in :func:`cross_entropy_loss`.
        return_argmax: bool, default False; also return each row's predicted class (see Returns).

    Returns:
        (loss_rows, lse, row_weight), float32 [N] each: l_n, log-sum-exp of the row, and the
        row's share of the mean denominator (w[y_n] or 0 if ignored; 1 for probability targets).
        Differentiable w.r.t. ``logits`` through ``loss_rows`` and ``lse`` (and w.r.t.
        probability targets through ``loss_rows``); the backward recomputes the softmax from
        ``logits``. With ``return_argmax`` a fourth output: argmax [N], the first index of each
        row's largest (scaled / softcapped) logit, as ``torch.argmax`` (NaN counts as largest), in
        the dtype of the class indices (int64 for probability targets); found in the forward pass
        that finds the row maximum; not differentiable. Token accuracy is
        ``sum((argmax == target) * counted) / sum(counted)``.
    """
    return cross_entropy_rows_for("cross_entropy_rows", logits, target, weight, ignore_index,
                                  label_smoothing, logit_scale, logit_softcap, return_argmax)


def cross_entropy_rows_for(api, logits, target, weight=None, ignore_index=-100,
                           label_smoothing=0.0, logit_scale=1.0, logit_softcap=0.0,
                           return_argmax=False):
    """:func:`cross_entropy_rows` whose argument errors name ``api`` (the Cell calling it)."""
    check_option_values(api, "mean", label_smoothing, 0.0)
    check_logit_map(api, logit_softcap, logit_scale)
    soft = validate_logits_and_target(api, logits, target, ignore_index)
    weight = class_weight(api, weight, logits.shape[1])
    return dispatch.cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, soft,
                                       float(logit_scale), float(logit_softcap),
                                       bool(return_argmax))


def cross_entropy_loss(input, target, weight=None, reduction="mean", ignore_index=-100,  # pylint: disable=redefined-builtin
                       label_smoothing=0.0, lse_square_scale_for_zloss=0.0, return_zloss=False,
                       logit_scale=1.0, logit_softcap=0.0):
    """Fused log_softmax + nll_loss, with class weights, ignore_index, label smoothing and z-loss.

    Args:
        input: [N, C] logits, float16 / bfloat16 / float32 (accumulated in float32).
        target: [N] int32/int64 class indices in [0, C) or equal to ``ignore_index``; or [N, C]
            float class probabilities (then ``ignore_index`` does not apply and "mean" divides by N).
        weight: optional [C] finite class weights of any sign (PyTorch semantics); default None
            (all 1).
        reduction: default "mean" (sum of l_n over sum of w[y_n] of non-ignored rows; 0 only when
            that sum is exactly 0), "sum" or "none".
        ignore_index: int, default -100; rows with this target contribute no loss and get zero
            gradient.
        label_smoothing: eps in [0, 1), default 0.0; the target mixes with the uniform
            distribution.
        lse_square_scale_for_zloss: s in [0, 1), default 0.0; z_n = s * lse_n^2 on non-ignored
            rows.
        return_zloss: bool, default False; return the z-loss (reduced like the loss; "mean" divides
            by the number of non-ignored rows). The z-loss is a separate output and is not added to
            ``loss``.
        logit_scale, logit_softcap: float scale != 0 (default 1.0) and float cap >= 0 (default
            0.0, no cap); the loss sees z = cap tanh(scale x / cap) (Gemma-style
            softcap, cap = ``logit_softcap`` > 0) or z = scale x (cap 0) in place of the logits
            x, applied inside the kernel pass; gradients are w.r.t. x. ``log_prob`` and
            ``lse_for_zloss`` are those of z.

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
    check_logit_map(api, logit_softcap, logit_scale)
    soft = validate_logits_and_target(api, input, target, ignore_index)
    weight = class_weight(api, weight, input.shape[1])
    return dispatch.cross_entropy_loss(input, target, weight, reduction, ignore_index,
                                       label_smoothing, lse_square_scale_for_zloss, return_zloss,
                                       soft, float(logit_scale), float(logit_softcap))


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight=None, grad_zloss=None,
                            lse_for_zloss=None, reduction="mean", ignore_index=-100,
                            label_smoothing=0.0, lse_square_scale_for_zloss=0.0):
    """Gradient of :func:`cross_entropy_loss` w.r.t. ``input``, from its ``log_prob`` output
    (the vendor's ``aclnnCrossEntropyLossGrad``).

    Args:
        grad_loss: gradient of ``loss``: 0-d (or [1]) for "mean"/"sum", [N] for "none"; float.
        log_prob: [N, C] float16 / bfloat16 / float32, the ``log_prob`` output of
            :func:`cross_entropy_loss` (softmax = exp(log_prob), computed in float32).
        target: the ``target`` given to :func:`cross_entropy_loss`: [N] int32/int64 class
            indices, or [N, C] float class probabilities.
        weight: optional [C] finite class weights, default None (all 1); the forward's.
        grad_zloss: optional gradient of ``zloss``, shaped like ``grad_loss``; default None (no
            z-loss term).
        lse_for_zloss: [N] float32 ``lse_for_zloss`` output of the forward, default None. The
            z-loss term is added only when ``grad_zloss`` and ``lse_for_zloss`` are both given and
            ``lse_square_scale_for_zloss`` > 0.
        reduction: "mean" (default), "sum" or "none"; the forward's.
        ignore_index: int, default -100; the forward's.
        label_smoothing: float in [0, 1), default 0.0; the forward's.
        lse_square_scale_for_zloss: float s in [0, 1), default 0.0; the forward's.

    Returns:
        grad_input [N, C] in the dtype of ``log_prob``; rows whose target is ``ignore_index`` get
        exact zeros.
    """
    api = "cross_entropy_loss_grad"
    check_option_values(api, reduction, label_smoothing, lse_square_scale_for_zloss)
    soft = validate_logits_and_target(api, log_prob, target, ignore_index, "log_prob")
    weight = class_weight(api, weight, log_prob.shape[1])
    return dispatch.cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss,
                                            lse_for_zloss, reduction, ignore_index,
                                            label_smoothing, lse_square_scale_for_zloss, soft)
