"""The Ascend backend behind the backend contract of :mod:`ms_xent._backends.dispatch`.

The dispatch sends here only what the vendor operators serve (class-index targets, no class
weights, no label smoothing, no z-loss; see its table); ``use_builtin`` picks MindSpore's built-in
primitive or ``ops.Custom(func="aclnnXxx")``.
"""

from ms_xent._backends.ascend import vendor_op


def cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing,  # pylint: disable=redefined-builtin,unused-argument
                       lse_square_scale_for_zloss, return_zloss, soft, *, use_builtin):
    """:func:`ms_xent.ops.cross_entropy_loss` by the vendor operator (``weight`` is None, the
    smoothing and z-loss options 0: the dispatch guarantees it)."""
    return vendor_op.vendor_cross_entropy_loss(input, target, reduction, ignore_index, use_builtin)


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss,  # pylint: disable=unused-argument
                            reduction, ignore_index, label_smoothing, lse_square_scale_for_zloss,
                            soft, *, use_builtin):
    """:func:`ms_xent.ops.cross_entropy_loss_grad` by the vendor operator."""
    return vendor_op.vendor_cross_entropy_loss_grad(grad_loss, log_prob, target, reduction,
                                                    ignore_index, use_builtin)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, *,  # pylint: disable=redefined-builtin
                                     use_builtin):
    """BCE with logits by the vendor operator."""
    return vendor_op.vendor_binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                             reduction, use_builtin)
