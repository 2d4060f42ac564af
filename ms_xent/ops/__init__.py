"""Functional ops of ms_xent: argument checks, then the backend chosen by
:mod:`ms_xent._backends.dispatch` (the fused CPU kernels, the composed backend, or the vendor
operators on Ascend)."""

from ms_xent.ops.bce_with_logits import binary_cross_entropy_with_logits
from ms_xent.ops._cross_entropy import (cross_entropy_loss, cross_entropy_loss_grad,
                                        cross_entropy_rows)
from ms_xent.ops.linear_cross_entropy import linear_cross_entropy
from ms_xent.ops._pytorch_cross_entropy import cross_entropy
from ms_xent.ops.vocab_parallel import vocab_parallel_cross_entropy_rows

__all__ = ["binary_cross_entropy_with_logits", "cross_entropy", "cross_entropy_loss",
           "cross_entropy_loss_grad", "cross_entropy_rows", "linear_cross_entropy", "vocab_parallel_cross_entropy_rows"]
