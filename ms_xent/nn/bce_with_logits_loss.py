"""BCEWithLogitsLoss Cell on the fused kernel of
:func:`ms_xent.ops.binary_cross_entropy_with_logits`.

Same constructor and ``construct(logits, labels)`` as ``mindspore.nn.BCEWithLogitsLoss`` (and
PyTorch's ``nn.BCEWithLogitsLoss``). MindFormers is not imported here; :mod:`ms_xent.mindformers`
registers this Cell under the alias ``MsXentBCEWithLogitsLoss``.
"""

import numpy as np
import mindspore as ms
from mindspore import nn

from ms_xent.ops.bce_with_logits import binary_cross_entropy_with_logits
from ms_xent.ops.validation import bce_reduction

API = "BCEWithLogitsLoss"


def _factor_tensor(name, value):
    """``weight`` / ``pos_weight`` as a float32 Tensor (None stays None).

    Accepts a Tensor, a numpy array, a number or a (nested) list, e.g. from a YAML config.
    """
    if value is None:
        return None
    if isinstance(value, ms.Tensor):
        values = value.astype(ms.float32).asnumpy()
    else:
        try:
            values = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{API}: `{name}` must be a Tensor, an array-like of numbers or None, "
                            f"got {value!r}") from error
    if (values < 0).any():
        raise ValueError(f"{API}: `{name}` must be non-negative, got min {values.min()}")
    return ms.Tensor(values)


class BCEWithLogitsLoss(nn.Cell):
    """Binary cross-entropy of logits with optional element and positive-class weights.

    Args:
        weight: optional non-negative weights (Tensor, array-like or number; default None: 1),
            any shape broadcastable to the labels; stored as float32.
        pos_weight: optional non-negative positive-class weights (default None: 1),
            broadcastable to the labels (a [C] vector weighs the classes of the last dim).
        reduction: "mean" (default), "sum" or "none", or the integer codes 1, 2, 0.

    Inputs:
        logits: float16 / bfloat16 / float32 tensor of any shape.
        labels: float tensor of the same shape with values in [0, 1].

    Outputs:
        The loss in the dtype of ``logits``: 0-d for "mean"/"sum", the shape of ``logits`` for
        "none". Differentiable w.r.t. ``logits`` and ``labels``; PYNATIVE and GRAPH mode.
    """

    def __init__(self, weight=None, pos_weight=None, reduction="mean"):
        super().__init__()
        self.reduction = bce_reduction(API, reduction)
        self.weight = _factor_tensor("weight", weight)
        self.pos_weight = _factor_tensor("pos_weight", pos_weight)

    def construct(self, logits, labels):
        """The loss of ``logits`` against ``labels``.

        Args:
            logits: float16 / bfloat16 / float32 tensor of any shape.
            labels: float tensor of the shape of ``logits``, values in [0, 1] (soft labels
                allowed); cast to the dtype of ``logits`` if it differs.

        Returns:
            The loss in the dtype of ``logits``: 0-d for "mean" / "sum", the shape of ``logits``
            for "none"; see :func:`ms_xent.ops.binary_cross_entropy_with_logits` for the formula.
        """
        return binary_cross_entropy_with_logits(logits, labels, self.weight, self.pos_weight,
                                                self.reduction)
