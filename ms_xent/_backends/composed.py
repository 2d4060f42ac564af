"""The composed backend: cross-entropy and BCE-with-logits from MindSpore primitives (exact
semantics), for any device.

It serves every call on a device without a better backend (GPU, and on Ascend what the vendor
operator cannot: label smoothing with gradients, z-loss, probability targets, class weights, N
outside the vendor's range; see :mod:`ms_xent._backends.dispatch`), and on CPU under
``MS_XENT_BACKEND=composed``, where the tests compare it with the C++ kernels. It shares no
arithmetic with the kernel path on purpose.

Everything is computed in float32 and cast back to the input dtype at the end.

- :func:`cross_entropy_rows` (the Cells' building block) is memory-lean: :class:`RowsCell` keeps
  only float32 [N] per-row values from the forward (loss, lse, the row's weight, and the shift
  state (row_max, log_sum)) and its bprop recomputes the softmax from the logits, as the CPU
  kernels do. Nothing [N, C] lives from the forward to the backward besides the logits.
- :func:`cross_entropy_loss` (the vendor-compatible op) reduces the rows of the same
  :class:`RowsCell` and returns log_prob = (x - m_n) - log_sum_n (not differentiable);
  :func:`cross_entropy_loss_grad`, whose input is ``log_prob`` rather than the logits, is the
  closed form of docs/semantics.md.

Numerics (as the CPU kernels):
- lse_n = m_n + log_sum_n with m_n = max_c x[n,c] (0 when it is not finite, so a row of -inf
  logits has lse = -inf and NaN / +inf propagate) and log_sum_n = -log1p(-rest), rest = 1 - p_max
  summed without the max's own term (:func:`split_log_sum_exp`), so that -log p = (m_n - x) + log_sum_n is a sum of two
  non-negative terms: no digits lost at huge offsets, full relative precision on confident rows.
- The softmax of the backward is exp((x - m_n) - log_sum_n), and the target's entry p[y] - 1 is
  expm1(log p[y]), never p[y] - 1.
- Ignored rows contribute exactly 0 to the loss, the z-loss and the gradient even when their
  logits are -inf (selection, not multiplication by the mask, as in the kernels).
- BCE uses softplus: -log(sigmoid(x)) = softplus(-x), -log(1 - sigmoid(x)) = x + softplus(-x).
"""

import functools

import mindspore as ms
from mindspore import nn, ops

from ms_xent._backends._mindspore import (check_first_order, counted_rows, executing_eagerly,
                                          expm1, log1p, softmax_input, tanh, total)
from ms_xent._backends._reductions import loss_and_zloss, mean_weight, upstream_per_row

F32 = ms.float32
# Named in the error of a second-order gradient: the bprops below return gradients computed from
# the saved shift as constants, so the gradient of a gradient would silently miss terms.
SECOND_ORDER_API = "ms_xent (composed backend)"


def _smoothed_probabilities(target, label_smoothing, n_classes):
    """t' = (1 - eps) t + eps / C, float32 [N, C]."""
    target = target.astype(F32)
    if label_smoothing > 0:
        target = (1.0 - label_smoothing) * target + label_smoothing / n_classes
    return target


def split_log_sum_exp(x, zeros_like, softmax, scatter):
    """(row_max, log_sum), float32 [N] each, lse = row_max + log_sum, with the precision of the
    CPU kernels' split and without broadcasting an [N, 1] tensor over [N, C] (slow on CPU):

    p = softmax(x) from MindSpore's fused kernel (exp(x - max) / sum: each p[c] to a few ulp),
    log_sum = -log p_max, from whichever of the two values of p_max is accurate: where the max
    carries most of the mass (p_max >= 1/2), -log1p(-rest) with rest = sum of p over every class
    but the first argmax = 1 - p_max, summed without the 1.0-sized term (log(sum) of a float32 sum
    holding 1.0 would keep only the digits of rest above 2^-24); elsewhere -log(p_max) of the
    argmax's own probability (1 - rest would cancel: on near-uniform rows of a large vocabulary
    rest is 1 - 1/C). row_max is 0 when it is not finite: a row of -inf gives (0, -inf); a row
    holding NaN gets log_sum NaN, as in the kernels."""
    row_max = ops.amax(x, 1)
    if x.shape[0] == 0:
        return row_max, row_max  # MindSpore's CPU Argmax refuses an empty batch
    minus_inf = row_max == float("-inf")
    # amax skips NaN: a row holding a NaN logit gets lse NaN explicitly; a row holding +inf gets
    # NaN too (inf - inf), as in the kernels.
    undefined = ops.isnan(x).any(axis=1) | (row_max == float("inf"))
    row_max = ops.select(ops.isfinite(row_max), row_max, zeros_like(row_max))
    p = softmax(softmax_input(x))
    top = ops.argmax(x, 1).reshape(-1, 1)
    rest = scatter(p, top, zeros_like(top).astype(F32)).sum(axis=1)
    p_max = ops.gather_elements(p, 1, top).reshape(-1)
    log_sum = ops.select(p_max >= 0.5, -log1p(-rest), -ops.log(p_max))
    log_sum = ops.select(minus_inf, ops.full_like(log_sum, float("-inf")), log_sum)
    return row_max, ops.select(undefined, log_sum * float("nan"), log_sum)


def _per_row(values, like):
    """[N] values broadcast to the [N, C] shape of ``like`` as a tensor of its own.

    MindSpore 2.9's CPU element-wise kernels broadcast an [N, 1] operand through index tables
    (measured: x * v[:, None] peaks at 5x the size of x, and is ~10x slower than a same-shape
    product); an explicit BroadcastTo costs one [N, C] buffer."""
    return ops.broadcast_to(values.reshape(-1, 1), like.shape)


def _checked_rows(target, ignore_index, n_classes):
    """(counted, out_of_range), bool [N]: the rows that count, and those of them whose class index
    is outside [0, C). Target values are unknown while a graph compiles, so instead of an error
    such rows get a NaN loss and a NaN gradient (never a silently wrapped index); ``counted`` is
    False on them, so that no index outside [0, C) reaches a gather."""
    counted = counted_rows(target, ignore_index)
    wide = target.astype(ms.int64)
    out_of_range = counted & ((wide < 0) | (wide >= n_classes))
    return counted & ~out_of_range, out_of_range


class RowKernels(nn.Cell):
    """The per-row forward and backward of the backend contract (see
    :class:`ms_xent._backends.cpu.backend.RowKernels`), not differentiable themselves.

    ``forward`` -> (loss_rows, lse, row_weight, (row_max, log_sum)), float32 [N] each;
    ``backward`` recomputes p = exp((x - row_max) - log_sum) and returns, per row,
    a dl_n/dx + b p with a = row_grad on counted rows (0 on ignored ones), b = row_grad_lse:
      class targets:  dl_n/dx = (1 - eps) w[y] (p - onehot(y)) + (eps / C) (W p - w)
      probabilities:  dl_n/dx = S p - w t',  t' = (1 - eps) t + eps / C,  S = sum_c w[c] t'[c]
    and exact zeros on rows where a = b = 0 (whatever their logits hold). Each [N, C] float32
    temporary lives only inside one of the two methods.
    """

    def __init__(self, ignore_index, label_smoothing, weighted, soft):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.weighted = weighted
        self.soft = soft
        # A primitive instance, not ops.zeros_like, in the forward and backward of a Cell with a
        # bprop: in GRAPH mode MindSpore 2.9 fails to differentiate around such a Cell ("The
        # pointer[input] is null") when it calls the composite zeros_like that autodiff also uses.
        self.zeros_like = ops.ZerosLike()
        # Likewise the fused softmax kernels and the scatter, used by the forward and the bprop.
        self.softmax = ops.Softmax(axis=1)
        self.log_softmax = ops.LogSoftmax(axis=1)
        self.scatter = ops.TensorScatterElements(axis=1)

    def forward(self, logits, target, weight):
        x = logits.astype(F32)
        n_classes = x.shape[1]
        row_max, log_sum = split_log_sum_exp(x, self.zeros_like, self.softmax, self.scatter)
        lse = row_max + log_sum
        # -log p = (row_max - x) + log_sum: two non-negative terms, no cancellation.
        if self.soft:
            probabilities = _smoothed_probabilities(target, self.label_smoothing, n_classes)
            if self.weighted:
                probabilities = probabilities * weight
            negative_log_prob = (row_max.reshape(-1, 1) - x) + log_sum.reshape(-1, 1)
            rows = (probabilities * negative_log_prob).sum(axis=1)
            return rows, lse, ops.ones_like(lse), (row_max, log_sum)
        counted, out_of_range = _checked_rows(target, self.ignore_index, n_classes)
        # Ignored rows: 0 in place of their (possibly non-finite) shift.
        kept_max = ops.select(counted, row_max, self.zeros_like(row_max))
        kept_log_sum = ops.select(counted, log_sum, self.zeros_like(log_sum))
        safe_target = ops.select(counted, target, self.zeros_like(target))
        picked = ops.gather_elements(x, 1, safe_target.reshape(-1, 1)).reshape(-1)
        target_weight = ops.gather(weight, safe_target, 0) if self.weighted else ops.ones_like(lse)
        rows = target_weight * ((kept_max - picked) + kept_log_sum)
        if self.label_smoothing > 0:
            negative_log_prob = (kept_max.reshape(-1, 1) - x) + kept_log_sum.reshape(-1, 1)
            if self.weighted:
                negative_log_prob = negative_log_prob * weight
            rows = ((1.0 - self.label_smoothing) * rows
                    + (self.label_smoothing / n_classes) * negative_log_prob.sum(axis=1))
        zeros = self.zeros_like(rows)
        rows = ops.select(counted, rows, zeros)
        return (ops.select(out_of_range, ops.full_like(rows, float("nan")), rows), lse,
                ops.select(counted, target_weight, zeros), (row_max, log_sum))

    def backward(self, logits, target, weight, shift, row_grad, row_grad_lse):
        x = logits.astype(F32)
        p = ops.exp((x - shift[0].reshape(-1, 1)) - shift[1].reshape(-1, 1))
        return self._gradient(x, p, logits, target, weight, row_grad, row_grad_lse, shift)

    def _gradient(self, x, p, logits, target, weight, row_grad, row_grad_lse, shift):
        """The gradient from the softmax p (see the class docstring); the target's entry from the
        shift state (row_max, log_sum), [N]-sized arithmetic only."""
        n_classes = x.shape[1]
        smooth = self.label_smoothing / n_classes
        if self.soft:
            # t' inline, not _smoothed_probabilities as in the forward: a module-level helper
            # called by both the forward and the bprop of a Cell breaks MindSpore 2.9's GRAPH
            # autodiff ("The pointer[func_graph->get_return()] is null").
            smoothed = target.astype(F32)
            if self.label_smoothing > 0:
                smoothed = (1.0 - self.label_smoothing) * smoothed + smooth
            if self.weighted:
                smoothed = smoothed * weight
            a = row_grad
            grad = (p * (a * smoothed.sum(axis=1) + row_grad_lse).reshape(-1, 1)
                    - a.reshape(-1, 1) * smoothed)
        else:
            counted, out_of_range = _checked_rows(target, self.ignore_index, n_classes)
            a = ops.select(counted, row_grad, self.zeros_like(row_grad))
            a = ops.select(out_of_range, a * float("nan"), a)
            safe_target = ops.select(counted, target, self.zeros_like(target))
            if self.weighted:
                target_weight = ops.gather(weight, safe_target, 0) * counted.astype(F32)
                total_weight = weight.sum()
            else:
                target_weight = counted.astype(F32)
                total_weight = float(n_classes)
            target_coef = a * (1.0 - self.label_smoothing) * target_weight
            k_rest = a * smooth * total_weight + row_grad_lse if self.label_smoothing > 0 else (
                row_grad_lse)
            grad = p * _per_row(target_coef + k_rest, p)
            smoothing_term = 0.0
            if self.label_smoothing > 0:
                class_term = weight if self.weighted else 1.0
                grad = grad - (a * smooth).reshape(-1, 1) * class_term
                smoothing_term = a * smooth * (target_weight if self.weighted else 1.0)
            # The target's entry with p[y] - 1 = expm1((x[y] - row_max) - log_sum), as the
            # kernels: -(1 - p[y]) keeps its digits on a confident row.
            log_p = ((ops.gather_elements(x, 1, safe_target.reshape(-1, 1)).reshape(-1)
                      - shift[0]) - shift[1])
            true_class = target_coef * expm1(log_p) + ops.exp(log_p) * k_rest - smoothing_term
            grad = self.scatter(grad, safe_target.reshape(-1, 1), true_class.reshape(-1, 1))
        silent = (a == 0) & (row_grad_lse == 0)
        grad = ops.masked_fill(grad, _per_row(silent, grad), 0.0)
        return grad.astype(logits.dtype)


class RowsCell(RowKernels):
    """Differentiable per-row cross-entropy: outputs (loss_rows, lse, row_weight, row_max,
    log_sum), float32 [N]; the bprop recomputes the softmax from the logits and the shift."""

    def construct(self, logits, target, weight):
        loss_rows, lse, row_weight, shift = self.forward(logits, target, weight)
        return loss_rows, lse, row_weight, shift[0], shift[1]

    def bprop(self, logits, target, weight, out, dout):
        # The shift is this row's own lse: MindSpore's fused Softmax kernel gives p directly.
        x = logits.astype(F32)
        shift = (out[3], out[4])
        grad = self._gradient(x, self.softmax(softmax_input(x)), logits, target, weight, dout[0],
                              dout[1], shift)
        if not self.soft:
            return grad, self.zeros_like(target), self.zeros_like(weight)
        # dl_n/dt[c] = -(1 - eps) w[c] log p[c]  (t' = (1 - eps) t + eps / C)
        log_p = self.log_softmax(softmax_input(x))
        class_term = weight if self.weighted else 1.0
        grad_target = -(1.0 - self.label_smoothing) * dout[0].reshape(-1, 1) * class_term * log_p
        return grad, grad_target.astype(target.dtype), self.zeros_like(weight)


class EagerRowsCell(RowsCell):
    """PyNative: :class:`RowsCell` whose bprop raises when it is itself differentiated (its
    gradient treats the saved shift as a constant, so a gradient of the gradient would be silently
    wrong). GRAPH mode refuses that at compile time already."""

    def bprop(self, logits, target, weight, out, dout):
        check_first_order(SECOND_ORDER_API)
        return super().bprop(logits, target, weight, out, dout)


@functools.lru_cache(maxsize=None)
def _rows_cell(ignore_index, label_smoothing, weighted, soft, eager):
    """One :class:`RowsCell` (:class:`EagerRowsCell` in PyNative) per configuration (an
    lru_cache, not a dict: a graph cannot hold a dict of Cells as a constant, and the wrapper is
    called as Python while compiling)."""
    return (EagerRowsCell if eager else RowsCell)(ignore_index, label_smoothing, weighted, soft)


def mapped_logits(logits, logit_scale=1.0, logit_softcap=0.0):
    """z = logit_softcap tanh(logit_scale x / logit_softcap), or logit_scale x without a softcap
    (float32 [N, C]; differentiable by autodiff). The logits themselves when neither is set."""
    if logit_scale == 1.0 and logit_softcap == 0.0:
        return logits
    z = logits.astype(F32) * logit_scale
    if logit_softcap > 0:
        z = logit_softcap * tanh(z / logit_softcap)
    return z


def cross_entropy_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                       soft=False, logit_scale=1.0, logit_softcap=0.0, return_argmax=False):
    """Same contract as :func:`ms_xent.ops.cross_entropy_rows`: float32 (loss_rows, lse,
    row_weight), differentiable w.r.t. ``logits`` through ``loss_rows`` and ``lse``; keeps only
    float32 [N] values for the backward (:class:`RowsCell`) when there is no logit map (with one,
    the mapped float32 [N, C] logits are kept by autodiff). With ``return_argmax`` also the first
    index of each row's largest mapped logit (dtype of the class indices, int64 for
    probabilities)."""
    weighted = weight is not None
    weight = weight.astype(F32) if weighted else ops.ones((1,), F32)
    z = mapped_logits(logits, logit_scale, logit_softcap)
    rows_cell = _rows_cell(int(ignore_index), float(label_smoothing), weighted, bool(soft),
                           executing_eagerly())
    outputs = rows_cell(z, target, weight)
    rows = (outputs[0], outputs[1], outputs[2])
    if not return_argmax:
        return rows
    index_dtype = ms.int64 if soft else target.dtype
    # MindSpore's Argmax skips NaN; a NaN counts as the largest value (as torch.argmax and the
    # kernels): the first NaN of a row wins.
    nan = ops.isnan(z)
    argmax = ops.select(nan.any(axis=1), ops.argmax(nan.astype(F32), 1), ops.argmax(z, 1))
    return rows + (ops.stop_gradient(argmax).astype(index_dtype),)


def cross_entropy_loss(input, target, weight=None, reduction="mean", ignore_index=-100,  # pylint: disable=redefined-builtin
                       label_smoothing=0.0, lse_square_scale_for_zloss=0.0, return_zloss=False,
                       soft=False, logit_scale=1.0, logit_softcap=0.0):
    """Same contract as :func:`ms_xent.ops.cross_entropy_loss` (arguments already validated).

    ``soft`` says that ``target`` holds [N, C] probabilities; ``weight`` is None or float [C].
    Returns (loss, log_prob, zloss, lse_for_zloss); ``loss``, ``zloss`` and ``lse_for_zloss`` are
    differentiable w.r.t. ``input``, ``log_prob`` is not. "mean" with class weights uses w / D
    (:func:`mean_weight`), as the CPU backend does.
    """
    mean_nonzero = None
    if weight is not None and reduction == "mean" and not soft:
        weight, mean_nonzero = mean_weight(weight, target, ignore_index)
    weighted = weight is not None
    z = mapped_logits(input, logit_scale, logit_softcap)
    rows_cell = _rows_cell(int(ignore_index), float(label_smoothing), weighted, bool(soft),
                           executing_eagerly())
    rows, lse, shares, row_max, log_sum = rows_cell(
        z, target, weight if weighted else ops.ones((1,), F32))
    log_prob = ops.stop_gradient((z.astype(F32) - row_max.reshape(-1, 1)) - log_sum.reshape(-1, 1))
    loss, zloss, lse_for_zloss = loss_and_zloss(
        rows, lse, shares, mean_nonzero, input, target, reduction, ignore_index,
        lse_square_scale_for_zloss, return_zloss, soft)
    return loss, log_prob.astype(input.dtype), zloss, lse_for_zloss


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight=None, grad_zloss=None,
                            lse_for_zloss=None, reduction="mean", ignore_index=-100,
                            label_smoothing=0.0, lse_square_scale_for_zloss=0.0, soft=False):
    """Same contract as :func:`ms_xent.ops.cross_entropy_loss_grad` (arguments already validated).

    With p = exp(log_prob), per row (docs/semantics.md):
    class indices:  dl/dx = m ((1 - eps) w[y] (p - onehot(y)) + (eps / C) (W p - w)),
                    W = sum_c w[c]
    probabilities:  dl/dx = p sum_c w[c] t'[c] - w t'
    z-loss:         dz/dx = m 2 s lse p
    """
    log_prob32 = log_prob.astype(F32)
    probabilities = ops.exp(log_prob32)
    n_classes = log_prob.shape[1]
    weight = None if weight is None else weight.astype(F32)
    loss_reduction = reduction
    if weight is not None and reduction == "mean" and not soft:
        weight, _ = mean_weight(weight, target, ignore_index)  # the "mean" is then a sum
        loss_reduction = "sum"
    if soft:
        smoothed = _smoothed_probabilities(target, label_smoothing, n_classes)
        if weight is not None:
            smoothed = smoothed * weight
        d_rows = probabilities * smoothed.sum(axis=1, keepdims=True) - smoothed
        counted = ops.ones_like(log_prob32[:, 0], dtype=ms.bool_)
        denominator = total(counted.astype(F32))
    else:
        counted = counted_rows(target, ignore_index)
        safe_target = ops.select(counted, target, ops.zeros_like(target))
        one_hot = ops.one_hot(safe_target, n_classes, ms.Tensor(1.0, F32), ms.Tensor(0.0, F32))
        if weight is None:
            target_weight = ops.ones_like(safe_target, dtype=F32)
        else:
            target_weight = ops.gather(weight, safe_target, 0)
        # p - onehot(y), the target's entry as expm1(log p[y]): no cancellation when p[y] ~ 1.
        p_minus_one_hot = ops.select(one_hot > 0, expm1(log_prob32), probabilities)
        d_rows = (1.0 - label_smoothing) * target_weight.reshape(-1, 1) * p_minus_one_hot
        if label_smoothing > 0:
            if weight is None:
                uniform = n_classes * probabilities - 1.0
            else:
                uniform = weight.sum() * probabilities - weight
            d_rows = d_rows + (label_smoothing / n_classes) * uniform
        denominator = total(ops.select(counted, target_weight, ops.zeros_like(target_weight)))
    counted_f32 = counted.astype(F32)
    grad = (upstream_per_row(grad_loss, loss_reduction, denominator, counted_f32).reshape(-1, 1)
            * d_rows)

    if grad_zloss is not None and lse_for_zloss is not None and lse_square_scale_for_zloss > 0:
        z_upstream = upstream_per_row(grad_zloss, reduction, total(counted_f32), counted_f32)
        z_scale = z_upstream * 2.0 * lse_square_scale_for_zloss * lse_for_zloss.astype(F32)
        grad = grad + z_scale.reshape(-1, 1) * probabilities
    grad = ops.where(counted.reshape(-1, 1), grad, ops.zeros_like(grad))
    return grad.astype(log_prob.dtype)


class BceCell(nn.Cell):
    """BCE with logits; ``weight`` / ``pos_weight`` float32 tensors broadcasting to the target
    (0-d ones when absent). The forward is the kernels' two-term softplus form

        l = w (pw t softplus(-x) + (1 - t) softplus(x)),
        softplus(+-x) = max(+-x, 0) + log1p(exp(-|x|))

    (no cancellation for x << 0, unlike PyTorch's (1 - t) x + (1 + (pw - 1) t) softplus(-x);
    x = -inf gives NaN as in PyTorch), and the bprop is the closed form of
    :func:`binary_cross_entropy_with_logits_grad` (autodiff of max / |x| at x = 0 would split the
    tie wrongly).
    """

    def __init__(self, reduction):
        super().__init__()
        self.reduction = reduction
        # Primitive instances: the bprop's closed form calls the functional ops, and a function
        # used by both the forward and the bprop of a Cell breaks MindSpore 2.9's GRAPH autodiff
        # ("The func graph is empty ... relu").
        self.relu = ops.ReLU()
        self.abs = ops.Abs()
        self.exp = ops.Exp()
        self.select = ops.Select()

    def construct(self, input, target, weight, pos_weight):  # pylint: disable=redefined-builtin
        logits = input.astype(F32)
        target32 = target.astype(F32)
        tail = log1p(self.exp(-self.abs(logits)))
        softplus_neg = self.relu(-logits) + tail
        softplus_pos = self.relu(logits) + tail
        elements = weight * (pos_weight * target32 * softplus_neg
                             + (1.0 - target32) * softplus_pos)
        elements = self.select(logits == float("-inf"), elements * float("nan"), elements)
        if self.reduction == "none":
            return elements.astype(input.dtype)
        if self.reduction == "sum":
            return total(elements).astype(input.dtype)
        return (total(elements) / elements.size).astype(input.dtype)

    def bprop(self, input, target, weight, pos_weight, out, dout):  # pylint: disable=redefined-builtin
        grad_input, grad_target = binary_cross_entropy_with_logits_grad(
            dout, input, target, weight, pos_weight, self.reduction)
        return grad_input, grad_target, weight * 0.0, pos_weight * 0.0


@functools.lru_cache(maxsize=None)
def _bce_cell(reduction):
    return BceCell(reduction)


def binary_cross_entropy_with_logits(input, target, weight=None, pos_weight=None,  # pylint: disable=redefined-builtin
                                     reduction="mean"):
    """BCE with logits (see :class:`BceCell`); ``weight`` and ``pos_weight`` broadcast to
    ``target``; "mean" averages over all elements; differentiable w.r.t. input and target."""
    weight = ops.ones((), F32) if weight is None else weight.astype(F32)
    pos_weight = ops.ones((), F32) if pos_weight is None else pos_weight.astype(F32)
    return _bce_cell(reduction)(input, target, weight, pos_weight)


def binary_cross_entropy_with_logits_grad(grad, input, target, weight=None, pos_weight=None,  # pylint: disable=redefined-builtin
                                          reduction="mean"):
    """Gradients of :func:`binary_cross_entropy_with_logits` w.r.t. ``input`` and ``target``,
    times the upstream ``grad`` (0-d for "mean"/"sum", the loss's shape for "none"), in the
    kernels' forms (no cancellation), with e = exp(-|x|), tail = log1p(e), r = 1 / (1 + e):
    dl/dx = w ((1 - t) sigmoid(x) - pw t sigmoid(-x)),  sigmoid(|x|) = r, sigmoid(-|x|) = e r,
    dl/dt = w (pw max(-x, 0) - max(x, 0) + (pw - 1) tail)   (= -w x without pos_weight).
    Each is returned in the dtype of its tensor.
    """
    logits = input.astype(F32)
    target32 = target.astype(F32)
    e = ops.exp(-ops.abs(logits))
    r = 1.0 / (1.0 + e)
    non_negative = logits >= 0
    sigmoid_pos = ops.select(non_negative, r, e * r)
    sigmoid_neg = ops.select(non_negative, e * r, r)
    positive = target32 if pos_weight is None else pos_weight.astype(F32) * target32
    d_input = (1.0 - target32) * sigmoid_pos - positive * sigmoid_neg
    if pos_weight is None:
        d_target = -logits
    else:
        pos_weight32 = pos_weight.astype(F32)
        d_target = (pos_weight32 * ops.relu(-logits) - ops.relu(logits)
                    + (pos_weight32 - 1.0) * ops.log1p(e))
    upstream = grad.astype(F32)
    if reduction == "mean":
        upstream = upstream / logits.size
    if weight is not None:
        upstream = upstream * weight.astype(F32)
    return (d_input * upstream).astype(input.dtype), (d_target * upstream).astype(target.dtype)
