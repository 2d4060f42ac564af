"""Per-row cross-entropy (loss_rows, lse, row_weight) from the vendor operator.

Forward: aclnnCrossEntropyLoss with reduction "none" gives the loss rows l_n = -log p[n, y_n] and
log_prob [N, C] (in the input dtype; the vendor keeps nothing else). The lse is recovered from
log_prob exactly as an identity: log_prob[n, c] = x[n, c] - lse_n at every column, taken at the
row's argmax column c*, where x is finite unless the whole row is -inf (then lse = -inf, as on
every backend) and log_prob is the smallest in magnitude (-log p_max): no -inf - -inf, and ignored
rows (whose target may be any out-of-range value) need no target column.

Ignored rows and counted rows with an out-of-range target (loss and gradient NaN): the vendor
sees class 0 in their place and ms_xent masks them (see
:func:`ms_xent._backends.ascend.vendor_op.vendor_target`).

Label smoothing (vendor gradient: 0.0 only) is composed around the vendor call, unweighted:
  l_n = (1 - eps) nll_n + (eps / C) sum_c (-log p_c)
  dl_n/dx = (1 - eps) (p - onehot(y)) + eps (p - 1 / C)
with (1 - eps) (p - onehot(y)) from aclnnCrossEntropyLossGrad (upstream (1 - eps) g_n).
The gradient through lse (z-loss of the Cells: 2 s lse_n p, or any use of lse) is g_lse p, with
p = exp(log_prob): also composed around the vendor gradient. Ignored rows: loss 0 and zero
gradient from the loss terms; their lse is still the row's and carries its gradient, as on every
backend.

Saved for the backward: log_prob [N, C] in the input dtype (the vendor's contract), where the
memory-lean composed rows save float32 [N] values only (see the dispatch table).
"""

import functools

import mindspore as ms
from mindspore import nn, ops

from ms_xent._backends.ascend.vendor_op import vendor_backward, vendor_forward, vendor_target

F32 = ms.float32


class VendorRowsCell(nn.Cell):
    """Outputs (loss_rows, lse, row_weight, log_prob); the first three float32 [N]."""

    def __init__(self, ignore_index, label_smoothing, vendor):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.vendor = vendor
        self.zeros_like = ops.ZerosLike()

    def construct(self, logits, target):
        counted, safe_target, undefined = vendor_target(target, self.ignore_index,
                                                        logits.shape[1])
        loss, log_prob = vendor_forward(logits, safe_target, "none", self.ignore_index,
                                        self.vendor)
        x = logits.astype(F32)
        log_prob32 = log_prob.astype(F32)
        top = ops.argmax(x, 1).reshape(-1, 1)
        row_max = ops.gather_elements(x, 1, top).reshape(-1)
        lse = row_max - ops.gather_elements(log_prob32, 1, top).reshape(-1)
        lse = ops.select(row_max == float("-inf"), row_max, lse)
        rows = loss.astype(F32)
        if self.label_smoothing > 0:
            spread = -log_prob32.sum(axis=1)
            rows = ((1.0 - self.label_smoothing) * rows
                    + (self.label_smoothing / x.shape[1]) * spread)
        zeros = self.zeros_like(rows)
        return (ops.select(counted, rows, zeros) + undefined, lse, counted.astype(F32), log_prob)

    def bprop(self, logits, target, out, dout):
        log_prob = out[3]
        # Inline, not vendor_target: a helper called in both the forward and the bprop breaks
        # MindSpore 2.9's GRAPH autodiff ("The func graph is empty").
        target64 = target.astype(ms.int64)
        counted = target64 != self.ignore_index
        in_range = (target64 >= 0) & (target64 < logits.shape[1])
        safe_target = ops.select(counted & in_range, target64, self.zeros_like(target64))
        row_grad = ops.select(counted, dout[0], self.zeros_like(dout[0]))
        grad = vendor_backward(((1.0 - self.label_smoothing) * row_grad).astype(log_prob.dtype),
                               log_prob, safe_target, "none", self.ignore_index,
                               self.vendor).astype(F32)
        p = ops.exp(log_prob.astype(F32))
        grad = grad + dout[1].reshape(-1, 1) * p
        if self.label_smoothing > 0:
            smooth = (self.label_smoothing * row_grad).reshape(-1, 1)
            grad = grad + smooth * (p - 1.0 / logits.shape[1])
        # Exact zeros on rows without an upstream gradient, whatever their logits hold (an ignored
        # row of -inf has p = NaN).
        silent = (row_grad == 0) & (dout[1] == 0)
        grad = ops.masked_fill(grad, silent.reshape(-1, 1), 0.0)
        # A counted row with an out-of-range target: NaN, as its loss row (see vendor_target).
        grad = ops.masked_fill(grad, (counted & ~in_range).reshape(-1, 1), float("nan"))
        return grad.astype(logits.dtype), self.zeros_like(target)


@functools.lru_cache(maxsize=None)
def _rows_cell(ignore_index, label_smoothing, vendor):
    return VendorRowsCell(ignore_index, label_smoothing, vendor)


def cross_entropy_rows(logits, target, ignore_index, label_smoothing, return_argmax, vendor):
    """:func:`ms_xent.ops.cross_entropy_rows` for class-index targets without class weights or a
    logit map (the dispatch guarantees it), by the vendor operator."""
    outputs = _rows_cell(int(ignore_index), float(label_smoothing), vendor)(logits, target)
    rows = (outputs[0], outputs[1], outputs[2])
    if not return_argmax:
        return rows
    return rows + (ops.stop_gradient(ops.argmax(logits, 1)).astype(target.dtype),)
