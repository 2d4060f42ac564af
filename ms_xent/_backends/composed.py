"""The composed backend: cross-entropy and BCE-with-logits from MindSpore primitives (exact SPEC
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
- :func:`cross_entropy_loss` (the vendor-compatible op, which returns log_prob [N, C] anyway)
  takes its gradient from MindSpore's autodiff; :func:`cross_entropy_loss_grad`, whose input is
  ``log_prob`` rather than the logits, is the closed form of SPEC section 2.

Numerics:
- lse_n = m_n + log_sum_n, log_sum_n = log(sum_c exp(x[n,c] - m_n)), m_n = max_c x[n,c] (0 when it
  is not finite, so a row of -inf logits has lse = -inf and NaN / +inf propagate). The softmax of
  the backward is exp((x - m_n) - log_sum_n): no cancellation at huge offsets. In the autodiff
  path m_n is held constant (``stop_gradient``): the gradient of lse w.r.t. m_n is exactly 0.
- -log_prob = lse - x, never -log(softmax(x)).
- Ignored rows contribute exactly 0 to the loss, the z-loss and the gradient even when their
  logits are -inf (selection, not multiplication by the mask, as in the kernels).
- BCE uses softplus: -log(sigmoid(x)) = softplus(-x), -log(1 - sigmoid(x)) = x + softplus(-x).
"""

import functools

import mindspore as ms
from mindspore import nn, ops

from ms_xent._backends._mindspore import counted_rows, log1p, total
from ms_xent._backends._reductions import reduce_rows, upstream_per_row

F32 = ms.float32


def _row_lse_parts(logits):
    """(sum_c exp(x[n, c] - m_n), m_n), float32 [N] each, so that lse_n = log(sum) + m_n.

    m_n is the row maximum, held constant for autodiff, and 0 when it is not finite: a row of
    -inf logits then has lse = log(0) + 0 = -inf (as the kernels report), and NaN / +inf still
    propagate through x - 0.
    """
    row_max = ops.stop_gradient(ops.amax(logits, 1, True))
    row_max = ops.select(ops.isfinite(row_max), row_max, ops.zeros_like(row_max))
    return ops.exp(logits - row_max).sum(axis=1), row_max.reshape(-1)


def _hard_target_rows(logits, lse, target, weight, ignore_index, label_smoothing):
    """(l_n, row share of the "mean" denominator) for class-index targets.

    l_n = m_n ((1 - eps) w[y_n] (lse_n - x[n, y_n]) + (eps / C) sum_c w[c] (lse_n - x[n, c])),
    share_n = m_n w[y_n], with m_n = 1{y_n != ignore_index}. Ignored rows give exactly 0 and a zero
    gradient, whatever their logits (``lse`` is 0 on them, see :func:`_row_values`).
    """
    n_classes = logits.shape[1]
    counted = counted_rows(target, ignore_index)
    safe_target = ops.select(counted, target, ops.zeros_like(target))
    picked = ops.gather_elements(logits, 1, safe_target.reshape(-1, 1)).reshape(-1)
    if weight is None:
        target_weight = ops.ones_like(picked)
    else:
        target_weight = ops.gather(weight, safe_target, 0)
    rows = target_weight * (lse - picked)
    if label_smoothing > 0:
        negative_log_prob = lse.reshape(-1, 1) - logits
        if weight is not None:
            negative_log_prob = negative_log_prob * weight
        uniform = negative_log_prob.sum(axis=1)
        rows = (1.0 - label_smoothing) * rows + (label_smoothing / n_classes) * uniform
    zeros = ops.zeros_like(rows)
    return ops.select(counted, rows, zeros), ops.select(counted, target_weight, zeros)


def _smoothed_probabilities(target, label_smoothing, n_classes):
    """t' = (1 - eps) t + eps / C, float32 [N, C]."""
    target = target.astype(F32)
    if label_smoothing > 0:
        target = (1.0 - label_smoothing) * target + label_smoothing / n_classes
    return target


def _row_values(input, target, weight, ignore_index, label_smoothing, soft):  # pylint: disable=redefined-builtin
    """float32 (l_n, lse_n, counted lse_n, share of the "mean" denominator, m_n, log_prob).

    The losses use "counted lse": lse_n on counted rows, and on ignored rows log(1) + 0 instead of
    their own, so that a row of -inf logits cannot send 0 * inf = NaN into the gradient.
    """
    logits = input.astype(F32)
    weight = None if weight is None else weight.astype(F32)
    sum_exp, row_max = _row_lse_parts(logits)
    lse = ops.log(sum_exp) + row_max
    log_prob = ops.stop_gradient(logits - lse.reshape(-1, 1))
    if soft:
        probabilities = _smoothed_probabilities(target, label_smoothing, logits.shape[1])
        if weight is not None:
            probabilities = probabilities * weight
        rows = (probabilities * (lse.reshape(-1, 1) - logits)).sum(axis=1)
        counted = ops.ones_like(lse)
        return rows, lse, lse, counted, counted, log_prob
    counted = counted_rows(target, ignore_index)
    counted_lse = (ops.log(ops.select(counted, sum_exp, ops.ones_like(sum_exp)))
                   + ops.select(counted, row_max, ops.zeros_like(row_max)))
    rows, shares = _hard_target_rows(logits, counted_lse, target, weight, ignore_index,
                                     label_smoothing)
    return rows, lse, counted_lse, shares, counted.astype(F32), log_prob


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

    def forward(self, logits, target, weight):
        x = logits.astype(F32)
        n_classes = x.shape[1]
        # log_sum = log sum_c exp(x - m) = -max_c log_softmax(x): MindSpore's fused LogSoftmax
        # kernel instead of broadcasting x - m over [N, C] (slow on CPU).
        row_max = ops.amax(x, 1)
        row_max = ops.select(ops.isfinite(row_max), row_max, self.zeros_like(row_max))
        log_sum = -ops.amax(ops.log_softmax(x, 1), 1)
        # amax skips NaN: a row holding a NaN logit gets lse NaN explicitly, as in the kernels.
        log_sum = ops.select(ops.isnan(x).any(axis=1), log_sum * float("nan"), log_sum)
        lse = row_max + log_sum
        if self.soft:
            probabilities = _smoothed_probabilities(target, self.label_smoothing, n_classes)
            if self.weighted:
                probabilities = probabilities * weight
            rows = (probabilities * (lse.reshape(-1, 1) - x)).sum(axis=1)
            return rows, lse, ops.ones_like(lse), (row_max, log_sum)
        counted = counted_rows(target, self.ignore_index)
        kept_lse = ops.select(counted, lse, self.zeros_like(lse))
        safe_target = ops.select(counted, target, self.zeros_like(target))
        picked = ops.gather_elements(x, 1, safe_target.reshape(-1, 1)).reshape(-1)
        target_weight = ops.gather(weight, safe_target, 0) if self.weighted else ops.ones_like(lse)
        rows = target_weight * (kept_lse - picked)
        if self.label_smoothing > 0:
            negative_log_prob = kept_lse.reshape(-1, 1) - x
            if self.weighted:
                negative_log_prob = negative_log_prob * weight
            rows = ((1.0 - self.label_smoothing) * rows
                    + (self.label_smoothing / n_classes) * negative_log_prob.sum(axis=1))
        zeros = self.zeros_like(rows)
        return (ops.select(counted, rows, zeros), lse, ops.select(counted, target_weight, zeros),
                (row_max, log_sum))

    def backward(self, logits, target, weight, shift, row_grad, row_grad_lse):
        x = logits.astype(F32)
        p = ops.exp((x - shift[0].reshape(-1, 1)) - shift[1].reshape(-1, 1))
        return self._gradient(x, p, logits, target, weight, row_grad, row_grad_lse)

    def _gradient(self, x, p, logits, target, weight, row_grad, row_grad_lse):
        """The gradient from the softmax p (see the class docstring)."""
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
            counted = counted_rows(target, self.ignore_index)
            a = ops.select(counted, row_grad, self.zeros_like(row_grad))
            safe_target = ops.select(counted, target, self.zeros_like(target))
            if self.weighted:
                target_weight = ops.gather(weight, safe_target, 0) * counted.astype(F32)
                total_weight = weight.sum()
            else:
                target_weight = counted.astype(F32)
                total_weight = float(n_classes)
            k = (a * ((1.0 - self.label_smoothing) * target_weight + smooth * total_weight)
                 + row_grad_lse)
            grad = p * k.reshape(-1, 1)
            if self.label_smoothing > 0:
                class_term = weight if self.weighted else 1.0
                grad = grad - (a * smooth).reshape(-1, 1) * class_term
            true_class = -(a * (1.0 - self.label_smoothing) * target_weight)
            grad = ops.tensor_scatter_elements(grad, safe_target.reshape(-1, 1),
                                               true_class.reshape(-1, 1), 1, "add")
        silent = (a == 0) & (row_grad_lse == 0)
        grad = ops.masked_fill(grad, silent.reshape(-1, 1), 0.0)
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
        grad = self._gradient(x, ops.softmax(x, 1), logits, target, weight, dout[0], dout[1])
        return grad, self.zeros_like(target), self.zeros_like(weight)


@functools.lru_cache(maxsize=None)
def _rows_cell(ignore_index, label_smoothing, weighted, soft):
    """One :class:`RowsCell` per configuration (an lru_cache, not a dict: a graph cannot hold a
    dict of Cells as a constant, and the wrapper is called as Python while compiling)."""
    return RowsCell(ignore_index, label_smoothing, weighted, soft)


def cross_entropy_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                       soft=False):
    """Same contract as :func:`ms_xent.ops.cross_entropy_rows`: float32 (loss_rows, lse,
    row_weight), differentiable w.r.t. ``logits`` through ``loss_rows`` and ``lse``; keeps only
    float32 [N] values for the backward (:class:`RowsCell`)."""
    weighted = weight is not None
    weight = weight.astype(F32) if weighted else ops.ones((1,), F32)
    rows = _rows_cell(ignore_index, float(label_smoothing), weighted, soft)
    outputs = rows(logits, target, weight)
    return outputs[0], outputs[1], outputs[2]


def cross_entropy_loss(input, target, weight=None, reduction="mean", ignore_index=-100,  # pylint: disable=redefined-builtin
                       label_smoothing=0.0, lse_square_scale_for_zloss=0.0, return_zloss=False,
                       soft=False):
    """Same contract as :func:`ms_xent.ops.cross_entropy_loss` (arguments already validated).

    ``soft`` says that ``target`` holds [N, C] probabilities; ``weight`` is None or float [C].
    Returns (loss, log_prob, zloss, lse_for_zloss); ``loss``, ``zloss`` and ``lse_for_zloss`` are
    differentiable w.r.t. ``input``, ``log_prob`` is not.
    """
    rows, lse, counted_lse, shares, counted, log_prob = _row_values(
        input, target, weight, ignore_index, label_smoothing, soft)
    loss = reduce_rows(rows, reduction, total(shares)).astype(input.dtype)

    zloss = ops.zeros((0,), input.dtype)
    if return_zloss:
        z_rows = lse_square_scale_for_zloss * counted_lse * counted_lse  # m_n s lse_n^2
        zloss = reduce_rows(z_rows, reduction, total(counted)).astype(input.dtype)
    lse_for_zloss = lse if lse_square_scale_for_zloss > 0 else ops.zeros((0,), F32)
    return loss, log_prob.astype(input.dtype), zloss, lse_for_zloss


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight=None, grad_zloss=None,
                            lse_for_zloss=None, reduction="mean", ignore_index=-100,
                            label_smoothing=0.0, lse_square_scale_for_zloss=0.0, soft=False):
    """Same contract as :func:`ms_xent.ops.cross_entropy_loss_grad` (arguments already validated).

    With p = exp(log_prob), per row (SPEC section 2):
    class indices:  dl/dx = m ((1 - eps) w[y] (p - onehot(y)) + (eps / C) (W p - w)),
                    W = sum_c w[c]
    probabilities:  dl/dx = p sum_c w[c] t'[c] - w t'
    z-loss:         dz/dx = m 2 s lse p
    """
    log_prob32 = log_prob.astype(F32)
    probabilities = ops.exp(log_prob32)
    n_classes = log_prob.shape[1]
    weight = None if weight is None else weight.astype(F32)
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
        d_rows = (1.0 - label_smoothing) * target_weight.reshape(-1, 1) * (probabilities - one_hot)
        if label_smoothing > 0:
            if weight is None:
                uniform = n_classes * probabilities - 1.0
            else:
                uniform = weight.sum() * probabilities - weight
            d_rows = d_rows + (label_smoothing / n_classes) * uniform
        denominator = total(ops.select(counted, target_weight, ops.zeros_like(target_weight)))
    counted_f32 = counted.astype(F32)
    grad = upstream_per_row(grad_loss, reduction, denominator, counted_f32).reshape(-1, 1) * d_rows

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
