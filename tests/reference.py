"""Shared oracles and tolerances for the test modules.

- ``numpy_cross_entropy``: float64 numpy reference of SPEC sections 1-3 (loss, z-loss, gradient).
- ``torch_cross_entropy``: PyTorch ``F.cross_entropy`` in float64, z-loss added by hand.
- ``TOLERANCE``: per-dtype (rtol, atol) for comparing ms_xent results with a float64 oracle.
- ``to_ms`` / ``to_numpy``: move arrays in and out of MindSpore in a given dtype (bfloat16
  included), so the oracle sees exactly the values the kernel saw.
"""

import numpy as np
import mindspore as ms

# (rtol, atol) against a float64 oracle evaluated on the same (already rounded) inputs.
# float32 is limited by float32 accumulation; the half types by rounding the outputs.
TOLERANCE = {
    ms.float32: (2e-5, 2e-6),
    ms.float16: (2e-3, 2e-4),
    ms.bfloat16: (1.6e-2, 2e-3),
}

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def to_ms(array, dtype=ms.float32):
    """A MindSpore tensor of ``dtype`` holding ``array`` (rounded to ``dtype``)."""
    return ms.Tensor(np.asarray(array, dtype=np.float32)).astype(dtype)


def to_numpy(tensor):
    """float64 numpy copy of a MindSpore tensor of any float dtype."""
    if tensor.dtype == ms.bfloat16:
        tensor = tensor.astype(ms.float32)
    return tensor.asnumpy().astype(np.float64)


def rounded(array, dtype):
    """``array`` after a round trip through ``dtype``: the values the kernel actually reads."""
    return to_numpy(to_ms(array, dtype))


def assert_close(actual, expected, dtype, what="", scale=1.0):
    """Compare with the per-dtype tolerance; ``scale`` widens it for accumulated quantities."""
    rtol, atol = TOLERANCE[dtype]
    actual = to_numpy(actual) if isinstance(actual, ms.Tensor) else np.asarray(actual, np.float64)
    np.testing.assert_allclose(actual, np.asarray(expected, np.float64), rtol=rtol * scale,
                               atol=atol * scale, err_msg=what)


IGNORE_INDEX = -100


def make_case(n_rows, n_classes, seed, ignore_fraction=0.0, soft=False, offset=0.0):
    """Random float32 logits [N, C] (std 3, plus ``offset``), targets (class indices with about
    ``ignore_fraction`` of them IGNORE_INDEX, or with ``soft`` probability rows) and positive
    class weights [C]."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n_classes)) * 3 + offset).astype(np.float32)
    if soft:
        t = rng.random((n_rows, n_classes)).astype(np.float32)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, n_classes, n_rows).astype(np.int64)
        t[rng.random(n_rows) < ignore_fraction] = IGNORE_INDEX
    w = (rng.random(n_classes) + 0.25).astype(np.float32)
    return x, t, w


def _log_softmax(x):
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def numpy_cross_entropy(x, target, weight=None, reduction="mean", ignore_index=-100,
                        label_smoothing=0.0, zloss_scale=0.0):
    """float64 reference. Returns dict with loss, zloss, log_prob, lse, grad (d loss/dx with an
    upstream gradient of ones), zgrad (d zloss/dx likewise) and grad_unit (the size of one
    upstream step in the gradient: 1/denominator for "mean", else 1).

    ``target`` is [N] class indices or [N, C] probabilities.
    """
    x = np.asarray(x, np.float64)
    n_rows, n_classes = x.shape
    w = np.ones(n_classes) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    log_prob = _log_softmax(x)
    prob = np.exp(log_prob)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    soft = np.asarray(target).ndim == 2
    if soft:
        t = (1 - eps) * np.asarray(target, np.float64) + eps / n_classes
        mask = np.ones(n_rows)
        rows = -(w * t * log_prob).sum(1)
        drows = prob * (w * t).sum(1, keepdims=True) - w * t
        denominator = float(n_rows)
    else:
        target = np.asarray(target, np.int64)
        mask = (target != ignore_index).astype(np.float64)
        y = np.where(mask > 0, target, 0)
        w_y = w[y] * mask
        rows = mask * (1 - eps) * w_y * -log_prob[np.arange(n_rows), y]
        if eps > 0:  # skipped at eps = 0 so that 0 * (-inf log-probabilities) is not NaN
            rows = rows + mask * eps / n_classes * -(w * log_prob).sum(1)
        one_hot = np.zeros_like(x)
        one_hot[np.arange(n_rows), y] = 1.0
        drows = mask[:, None] * ((1 - eps) * w_y[:, None] * (prob - one_hot)
                                 + eps / n_classes * (w.sum() * prob - w))
        denominator = w_y.sum()
    z_rows = mask * zloss_scale * lse ** 2
    dz_rows = (mask * 2 * zloss_scale * lse)[:, None] * prob

    def reduce(values, grads, denom):
        if reduction == "none":
            return values, grads
        if reduction == "sum":
            return values.sum(), grads
        if denom == 0:
            return 0.0, np.zeros_like(grads)
        return values.sum() / denom, grads / denom

    loss, grad = reduce(rows, drows, denominator)
    zloss, zgrad = reduce(z_rows, dz_rows, mask.sum())
    grad_unit = 1.0 / denominator if reduction == "mean" and denominator > 0 else 1.0
    return {"loss": loss, "zloss": zloss, "log_prob": log_prob, "lse": lse, "grad": grad,
            "zgrad": zgrad, "grad_unit": grad_unit}


def torch_cross_entropy(x, target, weight=None, reduction="mean", ignore_index=-100,
                        label_smoothing=0.0, zloss_scale=0.0):
    """PyTorch float64 oracle: (loss, d loss/dx, zloss, d zloss/dx) for an upstream of ones."""
    import torch
    import torch.nn.functional as F

    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    tt = torch.tensor(np.asarray(target))
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = F.cross_entropy(xt, tt, weight=wt, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(loss.sum(), xt)
    lse = torch.logsumexp(xt, dim=1)
    mask = torch.ones_like(lse) if tt.ndim == 2 else (tt != ignore_index).double()
    z_rows = zloss_scale * lse ** 2 * mask
    if reduction == "none":
        zloss = z_rows
    elif reduction == "sum":
        zloss = z_rows.sum()
    else:
        zloss = z_rows.sum() / mask.sum().clamp(min=1)
    (zgrad,) = torch.autograd.grad(zloss.sum(), xt)
    return (loss.detach().numpy(), grad.numpy(), zloss.detach().numpy(), zgrad.numpy())


def assert_close_to_peak(actual, expected, dtype, what="", unit=0.0):
    """Like :func:`assert_close`, but the absolute tolerance is relative to max|expected|
    (at least ``unit``, the size of one upstream gradient step where the expected values are all
    near zero, e.g. C = 1).

    Used for gradients, whose scale shrinks with 1/N ("mean") and 1/C (softmax): a fixed absolute
    tolerance would let a wrong gradient pass.
    """
    rtol, atol = TOLERANCE[dtype]
    expected = np.asarray(expected, np.float64)
    actual = to_numpy(actual) if isinstance(actual, ms.Tensor) else np.asarray(actual, np.float64)
    peak = max(float(np.abs(expected).max()) if expected.size else 0.0, unit)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(peak, 1e-30),
                               err_msg=what)


def assert_matches_torch_float32(result, x, target, weight, options, zgrad):
    """A float32 result of the fused op (dict with "loss", "grad" and, when options ask for the
    z-loss, "zloss") against PyTorch float64 with float32 tolerances; ``zgrad()`` gives the
    result's d zloss / d x (only called when the z-loss is returned)."""
    loss, grad, zloss, torch_zgrad = torch_cross_entropy(
        x, target, weight, options["reduction"], IGNORE_INDEX, options["label_smoothing"],
        options["lse_square_scale_for_zloss"])
    assert_close(result["loss"], loss, ms.float32, "loss vs torch")
    assert_close_to_peak(result["grad"], grad, ms.float32, "grad vs torch")
    if options["return_zloss"]:
        assert_close(result["zloss"], zloss, ms.float32, "zloss vs torch")
        assert_close_to_peak(zgrad(), torch_zgrad, ms.float32, "zgrad vs torch")


def torch_bce_with_logits(x, target, weight=None, pos_weight=None, reduction="mean",
                          grad_loss=None):
    """PyTorch float64 oracle of ``F.binary_cross_entropy_with_logits``.

    Returns (loss, d/dx, d/dtarget) for the upstream gradient ``grad_loss`` (ones when None;
    shaped like the loss). ``reduction`` is "none" / "mean" / "sum".
    """
    import torch
    import torch.nn.functional as F

    def as_torch(array, requires_grad=False):
        if array is None:
            return None
        return torch.tensor(np.asarray(array, np.float64), requires_grad=requires_grad)

    xt = as_torch(x, True)
    tt = as_torch(target, True)
    loss = F.binary_cross_entropy_with_logits(xt, tt, weight=as_torch(weight),
                                              pos_weight=as_torch(pos_weight), reduction=reduction)
    upstream = (torch.ones_like(loss) if grad_loss is None
                else as_torch(grad_loss).reshape(loss.shape))
    grad_x, grad_t = torch.autograd.grad(loss, (xt, tt), upstream)
    return loss.detach().numpy(), grad_x.numpy(), grad_t.numpy()


def torch_masked_cross_entropy(x, target, mask=None, weight=None, ignore_index=-100,
                               label_smoothing=0.0, zloss_scale=0.0, reduction="mean"):
    """PyTorch float64 oracle of the CrossEntropyLoss Cell (``ms_xent.nn``, MindFormers-style).

    Per row: r_n = l_n + s * rho_n * lse_n^2, with l_n from ``F.cross_entropy(reduction="none")``
    and rho_n = w[y_n] (0 for ignored rows, 1 for probability targets). "none" gives mask * r,
    "sum" its sum, "mean" sum(mask * r) / (sum(mask * rho) + 1e-8) (MindFormers' guard).
    Returns (loss, d loss.sum() / dx).
    """
    import torch
    import torch.nn.functional as F

    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    target = np.asarray(target)
    tt = torch.tensor(target.astype(np.float64 if target.ndim == 2 else np.int64))
    n_rows, n_classes = xt.shape
    wt = torch.ones(n_classes, dtype=torch.float64) if weight is None else torch.tensor(
        np.asarray(weight, np.float64))
    mt = torch.ones(n_rows, dtype=torch.float64) if mask is None else torch.tensor(
        np.asarray(mask, np.float64))
    rows = F.cross_entropy(xt, tt, weight=wt, reduction="none", ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    if tt.ndim == 2:
        rho = torch.ones(n_rows, dtype=torch.float64)
    else:
        counted = tt != ignore_index
        rho = torch.where(counted, wt[torch.where(counted, tt, 0)], 0.0)
    rows = rows + zloss_scale * rho * torch.logsumexp(xt, dim=1) ** 2
    if reduction == "none":
        loss = mt * rows
    elif reduction == "sum":
        loss = (mt * rows).sum()
    else:
        loss = (mt * rows).sum() / ((mt * rho).sum() + 1e-8)
    (grad,) = torch.autograd.grad(loss.sum(), xt)
    return loss.detach().numpy(), grad.numpy()


def torch_linear_cross_entropy(hidden, weight, target, bias=None, class_weight=None, mask=None,
                               ignore_index=-100, label_smoothing=0.0, zloss_scale=0.0,
                               softcap=0.0, scale=1.0, reduction="mean", guard=0.0,
                               upstream=None, zloss_class_weighted=False):
    """PyTorch float64 oracle of ``linear_cross_entropy`` / ``LinearCrossEntropyLoss``.

    logits = softcap(scale * (hidden @ weight.T + bias)) (cap * tanh(z / cap); none when 0); per
    row the loss mask_n * l_n with l_n from ``F.cross_entropy`` and the z-loss
    z_n = s * mask_n * m_n * lse_n^2 (m_n = 1 for counted rows; times rho_n = w[y_n] when
    ``zloss_class_weighted``, the Cell's convention). "none": loss + z; "sum": sum of both;
    "mean": sum loss / D + sum z / Dz with D = sum mask_n rho_n + guard and Dz = sum mask_n m_n
    + guard (Dz = D when ``zloss_class_weighted``; a part is 0 when its denominator is 0);
    "per_token": (sum loss + sum z * D / Dz, D).
    Returns (loss, {"hidden", "weight", "bias"} gradients) of sum(upstream * loss) (upstream 1
    when None; for "per_token" it multiplies the numerator).
    """
    import torch
    import torch.nn.functional as F

    def as_torch(array, requires_grad=False):
        return torch.tensor(np.asarray(array, np.float64), requires_grad=requires_grad)

    h = as_torch(hidden, True)
    w = as_torch(weight, True)
    b = as_torch(np.zeros(w.shape[0]) if bias is None else bias, True)
    n_rows, n_vocab = h.shape[0], w.shape[0]
    z = scale * (h @ w.T + b)
    x = softcap * torch.tanh(z / softcap) if softcap > 0 else z
    tt = torch.tensor(np.asarray(target, np.int64))
    cw = torch.ones(n_vocab, dtype=torch.float64) if class_weight is None else as_torch(
        class_weight)
    mt = torch.ones(n_rows, dtype=torch.float64) if mask is None else as_torch(mask)
    rows = F.cross_entropy(x, tt, weight=cw, reduction="none", ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    counted = tt != ignore_index
    rho = torch.where(counted, cw[torch.where(counted, tt, 0)], 0.0)
    z_weight = mt * (rho if zloss_class_weighted else counted.double())
    z_rows = zloss_scale * z_weight * torch.logsumexp(x, dim=1) ** 2
    loss_rows = mt * rows
    denominator = (mt * rho).sum() + guard
    z_denominator = z_weight.sum() + guard

    def mean(values, total):
        return values.sum() / total if total > 0 else values.sum() * 0.0

    if reduction == "none":
        loss = loss_rows + z_rows
    elif reduction == "sum":
        loss = loss_rows.sum() + z_rows.sum()
    elif reduction == "per_token":
        loss = loss_rows.sum() + z_rows.sum() * (denominator / z_denominator
                                                 if z_denominator > 0 else 0.0)
    else:
        loss = mean(loss_rows, denominator) + mean(z_rows, z_denominator)
    weights = torch.ones_like(loss) if upstream is None else as_torch(upstream).reshape(loss.shape)
    grads = torch.autograd.grad(loss, (h, w, b), weights)
    result = loss.detach().numpy()
    if reduction == "per_token":
        result = (result, float(denominator))
    return result, dict(zip(("hidden", "weight", "bias"), (g.numpy() for g in grads)))
