"""TEST INFRASTRUCTURE: a CPU stand-in for the three CANN aclnn operators, selected only by
``MS_XENT_BACKEND=ascend_emulated`` (or ``ms_xent.use_backend("ascend_emulated")``); nothing else
ever reaches it.

Each emulated operator receives exactly the positional arguments of its aclnn Custom primitive
(tensors, then host scalars, in the prototype's order, as built by the ``*_args`` functions of
:mod:`ms_xent._backends.ascend.vendor_op`; the host scalars are bound when the Cell is made, the
tensors are its inputs: a GRAPH-mode Cell with a bprop cannot take strings as inputs), checks them against the same :class:`KernelSpec`
(parameter count, C type of each host scalar, dtypes, optional inputs), refuses what the vendor
documents as unsupported with a vendor-like error, and returns the vendor's outputs (dtypes,
shapes, zero-size tensors for disabled outputs). The arithmetic is plain MindSpore CPU ops in
float32, rounded to the vendor's output dtype. Everything around the call (the choice table, the
``ops.Custom`` registration objects, the lse recovery from ``log_prob``, the composed extra
terms, the reductions) is the real Ascend-route code.

What this proves: the Ascend-route code is correct *given* an operator with the documented
contract. What it does not: the vendor kernel's own numerics, its behaviour outside the seed
documents, that MindSpore's aclnn bridge passes the arguments as the prototypes say, or the
device memory and speed.
"""

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from ms_xent._backends._mindspore import expm1, log1p


F32 = ms.float32
# C type of each reg_info attribute value type, as MindSpore maps them for aclnn.
_HOST_TYPES = {"str": str, "int": int, "double": float, "bool": bool}
# Vendor limits (seed documents): forward N in (0, 200000], gradient N < 200000.
FORWARD_MAX_ROWS = 200000
GRAD_MAX_ROWS = 199999
VENDOR_REDUCTIONS = ("none", "mean", "sum")
_DTYPE_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16",
                ms.int64: "int64", ms.int32: "int32", ms.float64: "float64"}


def _refuse(symbol, message):
    raise ValueError(f"{symbol}GetWorkspaceSize: ACLNN_ERR_PARAM_INVALID (161002): {message}")


def _spec_constants(spec):
    """The parts of a KernelSpec a graph can hold as constants (tuples of strings)."""
    return (spec.symbol, spec.inputs, spec.optional_inputs, spec.call_attrs, spec.dtype_rows)


@constexpr
def check_call(spec_constants, tensor_dtypes, host_values):
    """Checks one call against its spec (:func:`_spec_constants`): ``tensor_dtypes`` the dtype of
    each tensor input (None for an absent optional one), ``host_values`` the host scalars, in the
    prototype's order. Returns True; raises the vendor-like error otherwise."""
    symbol, inputs, optional_inputs, call_attrs, rows = spec_constants
    if len(tensor_dtypes) != len(inputs) or len(host_values) != len(call_attrs):
        _refuse(symbol, f"expected {len(inputs)} tensors and {len(call_attrs)} host scalars, got "
                        f"{len(tensor_dtypes)} and {len(host_values)}")
    names = []
    for name, dtype in zip(inputs, tensor_dtypes):
        if dtype is None and name not in optional_inputs:
            _refuse(symbol, f"{name} must not be nullptr")
        names.append(None if dtype is None else _DTYPE_NAMES.get(dtype, str(dtype)))
    for (name, value_type), value in zip(call_attrs, host_values):
        if type(value) is not _HOST_TYPES[value_type]:  # pylint: disable=unidiomatic-typecheck
            _refuse(symbol, f"{name} must be a {value_type}, got {type(value).__name__}")
    if not any(all(name in (None, row[i]) for i, name in enumerate(names)) for row in rows):
        _refuse(symbol, f"unsupported dtypes {dict(zip(inputs, names))}")
    return True


@constexpr
def _check_cross_entropy_values(symbol, input_shape, reduction, ignore_index, label_smoothing,
                                zloss_scale, return_zloss, zloss_inputs, max_rows):
    n_rows, n_classes = input_shape
    # A dynamic N (None or negative when compiling) is checked by the vendor at run time.
    if n_rows is not None and n_rows >= 0 and not 0 < n_rows <= max_rows:
        _refuse(symbol, f"N must be in (0, {max_rows}], got {n_rows}")
    if reduction not in VENDOR_REDUCTIONS:
        _refuse(symbol, f"reductionOptional must be one of {VENDOR_REDUCTIONS}, got {reduction!r}")
    if ignore_index >= n_classes:
        _refuse(symbol, f"ignoreIndex must be less than C = {n_classes}, got {ignore_index}")
    if not 0.0 <= label_smoothing <= 1.0:
        _refuse(symbol, f"labelSmoothing must be in [0, 1], got {label_smoothing}")
    if zloss_scale != 0.0 or return_zloss or zloss_inputs:
        _refuse(symbol, "zloss is not supported: lseSquareScaleForZloss must be 0.0, "
                        "returnZloss false and the zloss inputs nullptr")
    return True


@constexpr
def _check_grad_smoothing(label_smoothing):
    if label_smoothing != 0.0:
        _refuse("aclnnCrossEntropyLossGrad", f"labelSmoothing must be 0.0, got {label_smoothing}")
    return True


def _reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = rows.sum().reshape((1,))
    return total / denominator if reduction == "mean" else total


class EmulatedCrossEntropyLoss(nn.Cell):
    """aclnnCrossEntropyLoss on CPU (see the module docstring). Outputs (lossOut [N] or [1],
    logProbOut [N, C], zlossOut, lseForZlossOut) in the dtype of ``input``; the z-loss outputs are
    zero-size (the vendor returns empty tensors when z-loss is off, the only mode it supports).
    PyTorch's formula: l_n = w[y] ((1 - eps) (-log p[y]) + eps / C sum_c (-w_c log p_c) / w[y]),
    i.e. (1 - eps) w[y] (-log p[y]) + (eps / C) sum_c w_c (-log p_c); "mean" divides by
    sum of w[y] over the counted rows."""

    def __init__(self, spec, bprop, host_values):
        super().__init__()
        self.spec = _spec_constants(spec)
        self.symbol = spec.symbol
        # A primitive instance, not ops.zeros_like: MindSpore 2.9's GRAPH autodiff fails around a
        # Cell with a bprop that calls the composite zeros_like ("The pointer[input] is null").
        self.zeros_like = ops.ZerosLike()
        self.vendor_bprop = bprop
        self.host_values = host_values

    def construct(self, input, target, weight):  # pylint: disable=redefined-builtin
        reduction, ignore_index, label_smoothing, zloss_scale, return_zloss = self.host_values
        # Inline, no module-level helper shared with the gradient Cell: a function called in both
        # the forward and the bprop breaks MindSpore 2.9's GRAPH autodiff ("The func graph is
        # empty").
        check_call(self.spec, (input.dtype, target.dtype, None if weight is None else weight.dtype),
                   (reduction, ignore_index, label_smoothing, zloss_scale, return_zloss))
        _check_cross_entropy_values(self.symbol, input.shape, reduction, ignore_index,
                                    label_smoothing, zloss_scale, return_zloss, False,
                                    FORWARD_MAX_ROWS)
        x = input.astype(F32)
        # NaN propagates to its row (MindSpore's CPU LogSoftmax skips it in the max).
        row_max = ops.amax(x, 1, keepdims=True)
        shifted = x - ops.select(ops.isfinite(row_max), row_max, self.zeros_like(row_max))
        # (x - m) - log sum exp(x - m): to a few float32 ulp (MindSpore's CPU LogSoftmax is ~10
        # ulp off); NaN propagates to its row (amax skips it).
        log_prob = shifted - ops.log(ops.exp(shifted).sum(axis=1, keepdims=True))
        # A row holding NaN or +inf: log_prob NaN throughout (x - max: inf - inf), as a
        # max-shifted log-softmax gives.
        undefined = ops.isnan(x).any(axis=1) | (row_max.reshape(-1) == float("inf"))
        log_prob = ops.masked_fill(log_prob, undefined.reshape(-1, 1), float("nan"))
        class_weight = ops.ones((input.shape[1],), F32) if weight is None else weight
        weighted = -log_prob * class_weight
        # ignoreIndex < 0 ignores nothing (seed); targets outside [0, C) are undefined for the
        # vendor: NaN rows here, so that a caller sending one is seen.
        counted = target != ignore_index if ignore_index >= 0 else target == target
        in_range = (target >= 0) & (target < input.shape[1])
        safe_target = ops.select(in_range, target, self.zeros_like(target))
        picked = ops.gather_elements(weighted, 1, safe_target.reshape(-1, 1)).reshape(-1)
        nll = ops.select(counted, picked, self.zeros_like(picked))
        nll = ops.select(in_range | ~counted, nll, nll * float("nan"))
        rows = nll
        if label_smoothing > 0:
            spread = weighted.sum(axis=1)
            rows = ops.select(counted, (1.0 - label_smoothing) * nll
                              + (label_smoothing / input.shape[1]) * spread, nll)
        target_weight = ops.gather(class_weight, safe_target, 0) * counted.astype(F32)
        loss = _reduce(rows, reduction, target_weight.sum())
        empty = ops.zeros((0,), input.dtype)
        return loss.astype(input.dtype), log_prob.astype(input.dtype), empty, empty

    def bprop(self, input, target, weight, out, dout):  # pylint: disable=redefined-builtin
        # The bprop of the aclnn Custom it stands in for (vendor_op), unchanged.
        reduction, ignore_index, label_smoothing, zloss_scale, return_zloss = self.host_values
        grads = self.vendor_bprop(input, target, weight, reduction, ignore_index, label_smoothing,
                                  zloss_scale, return_zloss, out, dout)
        return grads[0], grads[1], grads[2]


class EmulatedCrossEntropyLossGrad(nn.Cell):
    """aclnnCrossEntropyLossGrad on CPU: out = g_n w[y_n] (exp(logProb) - onehot(y_n)) on counted
    rows ("mean": g / sum of w[y] over the counted rows), 0 on ignored rows, in the dtype of
    ``gradLoss``; refuses label smoothing, the z-loss inputs and N >= 200000 as the vendor."""

    def __init__(self, spec, host_values):
        super().__init__()
        self.spec = _spec_constants(spec)
        self.symbol = spec.symbol
        # A primitive instance, not ops.zeros_like: MindSpore 2.9's GRAPH autodiff fails around a
        # Cell with a bprop that calls the composite zeros_like ("The pointer[input] is null").
        self.zeros_like = ops.ZerosLike()
        self.host_values = host_values

    def construct(self, grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss):
        reduction, ignore_index, label_smoothing, zloss_scale = self.host_values
        check_call(self.spec, (grad_loss.dtype, log_prob.dtype, target.dtype,
                               None if weight is None else weight.dtype,
                               None if grad_zloss is None else grad_zloss.dtype,
                               None if lse_for_zloss is None else lse_for_zloss.dtype),
                   (reduction, ignore_index, label_smoothing, zloss_scale))
        _check_cross_entropy_values(self.symbol, log_prob.shape, reduction, ignore_index,
                                    label_smoothing, zloss_scale, False,
                                    grad_zloss is not None or lse_for_zloss is not None,
                                    GRAD_MAX_ROWS)
        _check_grad_smoothing(label_smoothing)
        n_classes = log_prob.shape[1]
        class_weight = ops.ones((n_classes,), F32) if weight is None else weight
        # ignoreIndex < 0 ignores nothing (seed); targets outside [0, C) are undefined for the
        # vendor: NaN rows here, so that a caller sending one is seen.
        counted = target != ignore_index if ignore_index >= 0 else target == target
        in_range = (target >= 0) & (target < n_classes)
        safe_target = ops.select(in_range, target, self.zeros_like(target))
        target_weight = ops.gather(class_weight, safe_target, 0) * counted.astype(F32)
        upstream = grad_loss.astype(F32)
        if reduction == "mean":
            upstream = upstream / target_weight.sum()
        per_row = (upstream * target_weight).reshape(-1, 1)
        one_hot = ops.one_hot(safe_target, n_classes, ms.Tensor(1.0, F32), ms.Tensor(0.0, F32))
        # p - onehot(y), the target's entry as expm1(log p[y]) (float32 arithmetic at its best:
        # the emulator stands for the vendor's contract, not for its rounding).
        log_p = log_prob.astype(F32)
        grad = per_row * ops.select(one_hot > 0, expm1(log_p), ops.exp(log_p))
        return grad.astype(grad_loss.dtype)


class EmulatedBinaryCrossEntropyWithLogits(nn.Cell):
    """aclnnBinaryCrossEntropyWithLogits on CPU: the documented
    l = -w (pw t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))) as w (pw t softplus(-x) +
    (1 - t) softplus(x)) (no cancellation at x << 0), weight and posWeight broadcast to the
    target; reduction 0 none ([shape of self]), 1 mean, 2 sum ([1]); output in the target's
    dtype."""

    def __init__(self, spec, bprop, host_values):
        super().__init__()
        self.spec = _spec_constants(spec)
        self.symbol = spec.symbol
        self.vendor_bprop = bprop
        self.reduction = host_values[0]
        # Primitive instances: the bprop (the composed closed form) calls the functional ops, and
        # one used by both breaks MindSpore 2.9's GRAPH autodiff ("The func graph is empty").
        self.relu = ops.ReLU()
        self.abs = ops.Abs()
        self.exp = ops.Exp()

    def bprop(self, input, target, weight, pos_weight, out, dout):  # pylint: disable=redefined-builtin
        # The bprop of the aclnn Custom it stands in for (vendor_op), unchanged.
        grads = self.vendor_bprop(input, target, weight, pos_weight, self.reduction, out, dout)
        return grads[0], grads[1], grads[2], grads[3]

    def construct(self, input, target, weight, pos_weight):  # pylint: disable=redefined-builtin
        reduction = self.reduction
        check_call(self.spec, (input.dtype, target.dtype, None if weight is None else weight.dtype,
                               None if pos_weight is None else pos_weight.dtype), (reduction,))
        _check_bce_values(input.shape, target.shape, reduction)
        x = input.astype(F32)
        t = target.astype(F32)
        positive = t if pos_weight is None else pos_weight.astype(F32) * t
        tail = log1p(self.exp(-self.abs(x)))  # accurate (MindSpore's CPU Log1p is log(1 + x))
        loss = positive * (self.relu(-x) + tail) + (1.0 - t) * (self.relu(x) + tail)
        # x = -inf: the documented formula's (1 - t) x + (1 + (pw - 1) t) softplus(-x) is NaN.
        loss = ops.select(x == float("-inf"), loss * float("nan"), loss)
        if weight is not None:
            loss = loss * weight.astype(F32)
        if reduction == 1:
            loss = loss.mean().reshape((1,))
        elif reduction == 2:
            loss = loss.sum().reshape((1,))
        return loss.astype(target.dtype)


@constexpr
def _check_bce_values(input_shape, target_shape, reduction):
    symbol = "aclnnBinaryCrossEntropyWithLogits"
    if tuple(input_shape) != tuple(target_shape):
        _refuse(symbol, f"target shape {target_shape} must equal self shape {input_shape}")
    if reduction not in (0, 1, 2):
        _refuse(symbol, f"reduction must be 0, 1 or 2, got {reduction}")
    return True
