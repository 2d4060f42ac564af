"""ms_xent: fused cross-entropy losses for MindSpore and MindFormers."""

from ms_xent import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
