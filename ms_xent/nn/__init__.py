"""Loss Cells of ms_xent (nn.Cell layer over the functional ops)."""

from ms_xent.nn.bce_with_logits_loss import BCEWithLogitsLoss
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss"]
