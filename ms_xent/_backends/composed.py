"""Cross-entropy and BCE-with-logits composed from MindSpore primitives (exact SPEC semantics).

This is the fallback of the Ascend path for what the vendor operator cannot serve (label smoothing
with gradients, z-loss, probability targets, class weights, N outside the vendor's range; see
:mod:`ms_xent.ops.backend`), and on CPU an implementation independent of the C++ kernels that the
tests compare with them. It shares no code with the kernel path on purpose.

Everything is computed in float32 and cast back to the input dtype at the end. Gradients of the
forward functions come from MindSpore's autodiff; :func:`cross_entropy_loss_grad`, whose input
is ``log_prob`` rather than the logits, is the closed form of SPEC section 2.

Numerics:
- lse_n = m_n + log(sum_c exp(x[n,c] - m_n)) with m_n = max_c x[n,c]. The gradient of lse with
  respect to m_n is exactly 0, so m_n is held constant for autodiff (``stop_gradient``): the
  gradient is then softmax(x) with no spurious term at the arg-max.
- -log_prob = lse - x, never -log(softmax(x)).
- Ignored rows contribute exactly 0 to the loss, the z-loss and the gradient even when their
  logits are -inf (selection, not multiplication by the mask, as in the kernels).
- BCE uses softplus: -log(sigmoid(x)) = softplus(-x), -log(1 - sigmoid(x)) = x + softplus(-x).
"""

import mindspore as ms
from mindspore import ops

F32 = ms.float32


def safe_divide(numerator, denominator):
    """numerator / denominator; 0 (and a zero gradient) where the denominator is 0."""
    positive = denominator > 0
    safe = ops.select(positive, denominator, ops.ones_like(denominator))
    return ops.select(positive, numerator / safe, ops.zeros_like(numerator))


def total(values):
    """Sum of all entries; exactly 0 for an empty tensor (MindSpore 2.9's CPU ReduceSum leaves the
    result of an empty input uninitialised, so a zero is prepended)."""
    return ops.cat((ops.zeros((1,), values.dtype), values.reshape(-1))).sum()


def _reduce(rows, reduction, denominator):
    """SPEC reductions of rows: "none" -> [N], "sum" -> 0-d, "mean" -> sum / denominator."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return total(rows)
    return safe_divide(total(rows), denominator)


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
    counted = target != ignore_index
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
    counted_rows = target != ignore_index
    counted_lse = (ops.log(ops.select(counted_rows, sum_exp, ops.ones_like(sum_exp)))
                   + ops.select(counted_rows, row_max, ops.zeros_like(row_max)))
    rows, shares = _hard_target_rows(logits, counted_lse, target, weight, ignore_index,
                                     label_smoothing)
    return rows, lse, counted_lse, shares, counted_rows.astype(F32), log_prob


def cross_entropy_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                       soft=False):
    """Same contract as :func:`ms_xent.ops.cross_entropy_rows`: float32 (loss_rows, lse,
    row_weight), differentiable w.r.t. ``logits`` through ``loss_rows`` and ``lse``."""
    rows, lse, _, shares, _, _ = _row_values(logits, target, weight, ignore_index,
                                             label_smoothing, soft)
    return rows, lse, shares


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
    loss = _reduce(rows, reduction, total(shares)).astype(input.dtype)

    zloss = ops.zeros((0,), input.dtype)
    if return_zloss:
        z_rows = lse_square_scale_for_zloss * counted_lse * counted_lse  # m_n s lse_n^2
        zloss = _reduce(z_rows, reduction, total(counted)).astype(input.dtype)
    lse_for_zloss = lse if lse_square_scale_for_zloss > 0 else ops.zeros((0,), F32)
    return loss, log_prob.astype(input.dtype), zloss, lse_for_zloss


def _upstream_per_row(grad, reduction, denominator, rows_like):
    """The upstream gradient as float32 [N]: g_n ("none"), g ("sum"), g / D ("mean", 0 if D = 0)."""
    grad = grad.astype(F32)
    if reduction == "none":
        return grad
    per_row = grad.reshape(()) * ops.ones_like(rows_like)
    if reduction == "sum":
        return per_row
    return safe_divide(per_row, denominator)


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
        counted_rows = ops.ones_like(log_prob32[:, 0], dtype=ms.bool_)
        denominator = total(counted_rows.astype(F32))
    else:
        counted_rows = target != ignore_index
        safe_target = ops.select(counted_rows, target, ops.zeros_like(target))
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
        denominator = total(ops.select(counted_rows, target_weight, ops.zeros_like(target_weight)))
    counted = counted_rows.astype(F32)
    grad = _upstream_per_row(grad_loss, reduction, denominator, counted).reshape(-1, 1) * d_rows

    if grad_zloss is not None and lse_for_zloss is not None and lse_square_scale_for_zloss > 0:
        z_upstream = _upstream_per_row(grad_zloss, reduction, total(counted), counted)
        z_scale = z_upstream * 2.0 * lse_square_scale_for_zloss * lse_for_zloss.astype(F32)
        grad = grad + z_scale.reshape(-1, 1) * probabilities
    grad = ops.where(counted_rows.reshape(-1, 1), grad, ops.zeros_like(grad))
    return grad.astype(log_prob.dtype)


def binary_cross_entropy_with_logits(input, target, weight=None, pos_weight=None,  # pylint: disable=redefined-builtin
                                     reduction="mean"):
    """l = -w (pw t log(sigmoid(x)) + (1 - t) log(1 - sigmoid(x)))
         = w ((1 - t) x + (1 + (pw - 1) t) softplus(-x)),
    ``weight`` and ``pos_weight`` broadcast to ``target``; "mean" averages over all elements.
    """
    logits = input.astype(F32)
    target32 = target.astype(F32)
    softplus_neg = ops.softplus(-logits)
    if pos_weight is None:
        elements = (1.0 - target32) * logits + softplus_neg
    else:
        log_weight = 1.0 + (pos_weight.astype(F32) - 1.0) * target32
        elements = (1.0 - target32) * logits + log_weight * softplus_neg
    if weight is not None:
        elements = elements * weight.astype(F32)
    if reduction == "none":
        return elements.astype(input.dtype)
    if reduction == "sum":
        return total(elements).astype(input.dtype)
    return (total(elements) / elements.size).astype(input.dtype)


def binary_cross_entropy_with_logits_grad(grad, input, target, weight=None, pos_weight=None,  # pylint: disable=redefined-builtin
                                          reduction="mean"):
    """Gradients of :func:`binary_cross_entropy_with_logits` w.r.t. ``input`` and ``target``,
    times the upstream ``grad`` (0-d for "mean"/"sum", the loss's shape for "none"):
    dl/dx = w ((1 + (pw - 1) t) sigmoid(x) - pw t)   (= w (sigmoid(x) - t) without pos_weight),
    dl/dt = w ((pw - 1) softplus(-x) - x)             (= -w x without pos_weight).
    Each is returned in the dtype of its tensor.
    """
    logits = input.astype(F32)
    target32 = target.astype(F32)
    probability = ops.sigmoid(logits)
    if pos_weight is None:
        d_input = probability - target32
        d_target = -logits
    else:
        pos_weight32 = pos_weight.astype(F32)
        d_input = (1.0 + (pos_weight32 - 1.0) * target32) * probability - pos_weight32 * target32
        d_target = (pos_weight32 - 1.0) * ops.softplus(-logits) - logits
    upstream = grad.astype(F32)
    if reduction == "mean":
        upstream = upstream / logits.size
    if weight is not None:
        upstream = upstream * weight.astype(F32)
    return (d_input * upstream).astype(input.dtype), (d_target * upstream).astype(target.dtype)
