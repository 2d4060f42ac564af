r"""The vocabulary-parallel cross-entropy: one Cell with an explicit bprop, on any rows backend.

Each of R ranks of a communication group holds the logits of a contiguous slice of the
vocabulary, x_r = x[:, v_r : v_r + C_r] (v_r = ``vocab_start``), the same rows and the same
targets. :class:`VocabParallelRows` returns the per-row values of the single-device
:func:`ms_xent.ops.cross_entropy_rows` over the whole vocabulary C, and its bprop returns each
rank's slice of the single-device gradient. It is built on the backend contract's ``RowKernels``
(the CPU kernels or the composed backend, see :mod:`ms_xent._backends.dispatch`): the per-row
forward runs on the local slice with label smoothing 0, and the per-row backward gets the *global*
shift state, so that it recomputes the global softmax directly.

Notation (per row n; y = target, m = 1{y != ignore_index}, w the class weights, W = sum_c w[c],
eps the label smoothing, o_r = 1{y is in rank r's slice} * m):

Forward on rank r (local slice quantities, then two collectives, then replicated arithmetic):
    kernel on x_r, local target (y - v_r if o_r else "ignored"), weights w_r:
        lse_r, loss_r = o_r w[y] (lse_r - x[y]), rho_r = o_r w[y]              (class targets)
        lse_r, loss_r = sum_{c in r} w[c] t[c] (lse_r - x[c]), M_r = sum_{c in r} w[c] t[c]
                                                                                 (probabilities)
    lse   = log sum_r exp(lse_r)      from an AllGather of the shift states (no AllReduce(MAX)):
            (m_r, s_r) with lse_r = m_r + s_r give M = max_r m_r, s = log sum_r exp(m_r - M + s_r),
            lse = M + s
    T     = w[y] ((M - x[y]) + s) on the owner            = w[y] (lse - x[y])
            (probabilities: sum_r [loss_r + M_r ((M - m_r) + (s - s_r))] = sum_c w t (lse - x))
    S     = sum_r x_r @ w_r                        = sum_c w[c] x[c]     (only when eps > 0)
    l_n   = (1-eps) T + (eps/C) m (W lse - S)
    Both summands of T are non-negative: no cancellation. T, rho, S and W travel in one
    AllReduce(SUM).

Backward on rank r, with upstream a_n = dL/dl_n and b_n = dL/dlse_n (the same on every rank,
since every rank computes the same loss from these outputs), P = softmax over the whole
vocabulary = exp(x_r - lse):
    dl_n/dx_r = (1-eps) w[y] (P - 1{c=y}) + (eps/C) (W P - w_r[c])               (class targets)
    dl_n/dx_r = (1-eps) (M P - w_r t_r) + (eps/C) (W P - w_r[c]),  M = sum_c w t   (probabilities)
    dlse/dx_r = P
The per-row backward (label smoothing 0, the global shift state, local target) computes
P (a' w_r[y] + b') - a' w[y] 1{c=y} on the rank that owns y and P b' elsewhere
(probabilities: P (a' M_r + b') - a' w_r t_r), so it is called with
    a' = (1-eps) m a,   b' = a c_r + b,
    c_r = m ((1-eps) w[y] (1 - o_r) + (eps/C) W)                                 (class targets)
    c_r = (1-eps) (M - M_r) + (eps/C) W                                          (probabilities)
where c_r is the part of the lse coefficient that the kernel does not add itself. It is a sum of
non-negative terms, so the gradient has the single-device kernel's rounding. The smoothing term
-(eps/C) m a w_r[c] is a rank-1 product added outside the kernel (only when eps > 0).

No gradient flows through the collectives: the bprop is explicit, so AllReduce's own backward
(an AllReduce(SUM) of the upstream gradient, which would multiply by R the gradient of a loss
that every rank computes) never runs.

The shift states are combined in float64 and rounded once: every softmax value exp(x - lse) of
the backward inherits the absolute error of lse as a relative error, so lse must not lose more
than the single-device rounding (~ulp(lse), about 1e-6 for lse in [8, 16)).

Outputs: (loss_rows, lse, row_weight) float32 [N], the same on every rank, then what the bprop
needs: lse_coefficient (c_r above), counted (m, or 1 for probabilities), the local target and the
global shift state (row_max, log_sum).
"""

import mindspore as ms
from mindspore import nn, ops

from ms_xent._backends._mindspore import counted_rows

F32 = ms.float32
# Local target of the rows whose class another rank owns: never a valid local index.
NOT_OWNED = -1


class VocabParallelRows(nn.Cell):
    """Per-row cross-entropy of vocabulary-sharded logits; see the module docstring.

    Args:
        rows: the rows backend's ``RowKernels`` for (NOT_OWNED, 0.0, weighted, soft).
        ignore_index, label_smoothing: as in :func:`ms_xent.ops.cross_entropy_rows`.
            Without class weights the ``weight`` input must hold ones (it still gives W and
            sum_c w[c] x[c]).
        soft: probability targets (the target input is the local [N, C_r] slice).
        num_classes: C, the size of the whole vocabulary.
        vocab_start: v_r, the first class of this rank's slice.
        group, world_size: the communication group of the R ranks sharing the rows; with
            world_size 1 no collective is created.

    Inputs: logits [N, C_r], target [N] (global class indices) or [N, C_r], weight [C_r] float32.
    """

    def __init__(self, rows, ignore_index, label_smoothing, soft, num_classes, vocab_start, group,
                 world_size):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.soft = soft
        self.num_classes = num_classes
        self.vocab_start = vocab_start
        self.world_size = world_size
        self.smooth = label_smoothing / num_classes
        self.rows = rows
        self.matmul = ops.MatMul()
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.zeros_like = ops.ZerosLike()
        if world_size > 1:
            self.all_gather = ops.AllGather(group)
            self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, group)

    def _local_target(self, target, shard_classes):
        """(local target, o_r as bool): y - v_r where this rank owns y, NOT_OWNED elsewhere."""
        local = target - self.vocab_start
        owned = (local >= 0) & (local < shard_classes) & counted_rows(target, self.ignore_index)
        return ops.select(owned, local, ops.full_like(local, NOT_OWNED)), owned

    def _global_shift(self, shift_r):
        """(lse, global shift state) from the ranks' (row_max, log_sum) pairs, by one AllGather.

        M = max_r m_r is taken locally over the gathered rows (AllReduce(MAX) is refused on CPU),
        over the slices that hold an element above -inf (log_sum_r > -inf: an all -inf slice
        reports row_max 0 by convention, which must not become the reference);
        s = log sum_r exp(m_r - M + s_r) in float64, so that lse = M + s is rounded once.
        """
        if self.world_size == 1:
            return shift_r[0] + shift_r[1], shift_r
        gathered = self.all_gather(ops.stack(shift_r)).reshape((self.world_size, 2, -1))
        gathered = self.cast(gathered, ms.float64)
        row_max, log_sum = gathered[:, 0], gathered[:, 1]
        minus_inf = ops.full_like(row_max, float("-inf"))
        row_max = ops.select(log_sum == minus_inf, minus_inf, row_max)
        top = row_max.max(axis=0)
        # A row that is -inf on every rank stays -inf (like the kernel), NaN and +inf propagate.
        top = ops.select(ops.isfinite(top), top, ops.full_like(top, 0.0))
        total_log_sum = ops.log(ops.exp(row_max - top + log_sum).sum(axis=0))
        return self.cast(top + total_log_sum, F32), (self.cast(top, F32),
                                                     self.cast(total_log_sum, F32))

    def _sum_over_ranks(self, parts):
        """Elementwise sums over the group of equally shaped [N] tensors, in one AllReduce."""
        if self.world_size == 1:
            return parts
        return ops.unstack(self.all_reduce(ops.stack(parts)))

    def _dot_weight(self, matrix, weight):
        """matrix @ weight in float32 (sum_c matrix[n, c] w[c]), [N]."""
        return self.matmul(self.cast(matrix, F32), self.reshape(weight, (-1, 1))).reshape((-1,))

    def construct(self, logits, target, weight):
        """(loss_rows, lse, row_weight) and, for the bprop, (lse_coefficient, counted, local
        target); see the module docstring."""
        shard_classes = logits.shape[1]
        if self.soft:
            local_target = target
            loss_r, lse_r, _, shift_r = self.rows.forward(logits, target, weight)
            mass_r = self._dot_weight(target, weight)
            owns = mass_r != 0
            counted = ops.ones_like(lse_r)
        else:
            local_target, owns = self._local_target(target, shard_classes)
            loss_r, lse_r, mass_r, shift_r = self.rows.forward(logits, local_target, weight)
            counted = counted_rows(target, self.ignore_index).astype(F32)
        lse, shift = self._global_shift(shift_r)
        # On the owning rank only (elsewhere the local values may be -inf): class targets
        # rho_r ((M - x[y]) + s), both terms >= 0 and x[y] -inf gives inf even when the owner's
        # whole slice is -inf; probabilities loss_r + M_r ((M - m_r) + (s - s_r)).
        if self.soft:
            target_r = loss_r + mass_r * ((shift[0] - shift_r[0]) + (shift[1] - shift_r[1]))
        else:
            picked = ops.gather_elements(self.cast(logits, F32), 1,
                                         ops.select(owns, local_target,
                                                    self.zeros_like(local_target)).reshape(-1, 1))
            target_r = mass_r * ((shift[0] - picked.reshape(-1)) + shift[1])
        target_r = ops.select(owns, target_r, ops.full_like(lse, 0.0))
        parts = [target_r, mass_r, owns.astype(F32)]
        if self.label_smoothing > 0:
            parts += [self._dot_weight(logits, weight), weight.sum() * ops.ones_like(lse)]
        summed = self._sum_over_ranks(parts)
        target_term, mass, owners = summed[0], summed[1], summed[2]

        loss_rows = (1.0 - self.label_smoothing) * target_term
        lse_coefficient = (1.0 - self.label_smoothing) * (mass - mass_r)
        if self.label_smoothing > 0:
            weighted_logits, total_weight = summed[3], summed[4]
            # Selected, not multiplied by `counted`: an ignored row may hold -inf logits (0 * inf).
            smoothing = self.smooth * (total_weight * lse - weighted_logits)
            loss_rows = loss_rows + ops.select(counted > 0, smoothing, ops.full_like(lse, 0.0))
            lse_coefficient = lse_coefficient + self.smooth * total_weight
        lse_coefficient = counted * lse_coefficient
        if self.soft:
            row_weight = counted
        else:
            row_weight = mass
            # A counted row that no rank owns has a target outside [0, C): NaN, never silence.
            unowned = (counted > 0) & (owners == 0)
            loss_rows = ops.select(unowned, ops.full_like(loss_rows, float("nan")), loss_rows)
        return (loss_rows, lse, row_weight, lse_coefficient, counted, local_target, shift[0],
                shift[1])

    def bprop(self, logits, target, weight, out, dout):
        """Each rank's slice of the single-device gradient, from one backward-kernel call.

        Uses only primitive instances and arithmetic: in GRAPH mode MindSpore 2.9 fails to
        compile a Cell whose construct and bprop both call the same composite function
        (ops.zeros_like, ops.full_like: "The pointer[input] is null", "The func graph is empty").
        """
        lse_coefficient, counted, local_target = out[3], out[4], out[5]
        grad_loss, grad_lse = dout[0], dout[1]
        counted_grad = grad_loss * counted
        row_grad = (1.0 - self.label_smoothing) * counted_grad
        row_grad_lse = grad_loss * lse_coefficient + grad_lse
        grad = self.rows.backward(logits, local_target, weight, (out[6], out[7]), row_grad,
                                  row_grad_lse)
        if self.label_smoothing > 0:
            # -(eps/C) m a w_r[c]: a rank-1 product, one extra [N, C_r] tensor.
            smoothing = self.matmul(self.reshape(self.smooth * counted_grad, (-1, 1)),
                                    self.reshape(weight, (1, -1)))
            grad = self.cast(self.cast(grad, F32) - smoothing, logits.dtype)
        return grad, self.zeros_like(target), self.zeros_like(weight)
