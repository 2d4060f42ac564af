"""The Ascend backend behind the backend contract of :mod:`ms_xent._backends.dispatch`.

The dispatch sends here only what the vendor operators serve (see its tables); ``vendor`` names
the route: MindSpore's built-in primitive (``ascend_builtin``), ``ops.Custom(func="aclnnXxx")``
(``ascend_aclnn_custom``) or, as test infrastructure on CPU, the emulator of the aclnn operators
(``ascend_emulated``), which takes the place of the aclnn call and nothing else.
"""

from ms_xent._backends.ascend import rows, vendor_op


def cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, soft,  # pylint: disable=unused-argument
                       logit_scale, logit_softcap, return_argmax, *, vendor):
    """:func:`ms_xent.ops.cross_entropy_rows` by the vendor operator (class indices, no weight,
    no logit map: the dispatch guarantees it)."""
    return rows.cross_entropy_rows(logits, target, ignore_index, label_smoothing, return_argmax,
                                   vendor)


def cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing,  # pylint: disable=redefined-builtin,unused-argument
                       lse_square_scale_for_zloss, return_zloss, soft, *, vendor):
    """:func:`ms_xent.ops.cross_entropy_loss` by the vendor operator (``weight`` is None, the
    smoothing and z-loss options 0: the dispatch guarantees it)."""
    return vendor_op.vendor_cross_entropy_loss(input, target, reduction, ignore_index, vendor)


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss,  # pylint: disable=unused-argument
                            reduction, ignore_index, label_smoothing, lse_square_scale_for_zloss,
                            soft, *, vendor):
    """:func:`ms_xent.ops.cross_entropy_loss_grad` by the vendor operator."""
    return vendor_op.vendor_cross_entropy_loss_grad(grad_loss, log_prob, target, reduction,
                                                    ignore_index, vendor)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, *,  # pylint: disable=redefined-builtin
                                     vendor):
    """BCE with logits by the vendor operator."""
    return vendor_op.vendor_binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                             reduction, vendor)
