"""The pieces MindFormers' training needs to run on CPU.

``MFTrainOneStepCell`` (the default ``runner_wrapper`` of a MindFormers config) inherits MindSpore's
loss-scale overflow check, which on any device other than GPU / Ascend 910B reads the Ascend float
status registers (``NPUGetFloatStatusV2``): on CPU the graph does not compile.
:class:`MsXentTrainOneStepCell` is the same cell with an overflow check that works on every device:
a gradient overflowed when it holds a non-finite value.
"""

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper import MFTrainOneStepCell
from mindspore import ops
from mindspore.common import dtype as mstype

_count_nonfinite_grads = ops.MultitypeFuncGraph("_count_nonfinite_grads")


@_count_nonfinite_grads.register("Tensor")
def _nonfinite_flag(grad):
    """1.0 if ``grad`` holds a NaN or an Inf, else 0.0."""
    return ops.logical_not(ops.isfinite(grad).all()).astype(mstype.float32)


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class MsXentTrainOneStepCell(MFTrainOneStepCell):
    """``MFTrainOneStepCell`` whose loss-scale overflow check uses ``ops.isfinite``.

    Select it in a MindFormers config with ``runner_wrapper: {type: MsXentTrainOneStepCell, ...}``;
    every other option of ``MFTrainOneStepCell`` is unchanged. Under data parallel the count of
    non-finite gradients is summed over devices (AllReduce SUM, which CPU supports).
    """

    def get_overflow_status(self, status, compute_output):
        """True when any gradient in ``compute_output`` holds a NaN or an Inf."""
        nonfinite = ops.addn(self.hyper_map(_count_nonfinite_grads, compute_output))
        if self.is_distributed:
            nonfinite = self.allreduce(nonfinite)
        return nonfinite > 0
