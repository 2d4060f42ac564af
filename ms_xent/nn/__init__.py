"""Loss Cells of ms_xent (nn.Cell layer over the functional ops)."""

from ms_xent.nn.bce_with_logits_loss import BCEWithLogitsLoss
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.nn.linear_cross_entropy_loss import LinearCrossEntropyLoss
from ms_xent.nn.token_accuracy import TokenAccuracyMonitor

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss",
           "TokenAccuracyMonitor"]
