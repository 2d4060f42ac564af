"""ms_xent: fused cross-entropy losses for MindSpore and MindFormers.

- :mod:`ms_xent.ops`: functional ops over the fused kernels (``cross_entropy_loss``, ...).
- :mod:`ms_xent.nn`: loss Cells (``CrossEntropyLoss``, ``BCEWithLogitsLoss``, ``LinearCrossEntropyLoss``).
- :mod:`ms_xent.mindformers`: registration with MindFormers (optional dependency).
- :func:`use_backend`: run the calls inside a ``with`` block on one backend ("auto", "cpu",
  "composed", "ascend", "ascend_emulated"), overriding ``MS_XENT_BACKEND`` (see ``ms_xent/_backends/dispatch.py``).
"""

from ms_xent import nn, ops
from ms_xent._backends.dispatch import use_backend
from ms_xent.nn import BCEWithLogitsLoss, CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss", "nn", "ops",
           "use_backend", "__version__"]
