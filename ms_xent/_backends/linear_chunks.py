"""The row-chunked fused linear + cross-entropy on any device: the chunk arithmetic (MindSpore
MatMul + the rows backend's per-row cross-entropy, see :mod:`ms_xent._backends.dispatch`) and its
autodiff wrappers.

The full logits ``x = softcap(scale * (hidden @ weight.T + bias))`` [N, V] and their gradient never
exist: rows are processed in chunks of ``chunk_rows``, and each chunk's logits live only while the
chunk is processed. Per chunk (rows R), with per-row factors ``row_coef`` (a_n) and ``z_coef``
(c_n) from the caller (they carry the reduction, the mask and the denominator):

    z      = (scale * hidden[R]) @ weight.T + scale * bias    (float32, [c, V])
    x      = cap * tanh(z / cap)        (x = z when cap == 0)
    l_n, lse_n  <- per-row CE forward on x                    (RowKernels.forward)
    value_n     = a_n l_n + c_n lse_n^2
    dL/dx  = CE backward with row_grad = a_n, row_grad_lse = 2 c_n lse_n   (RowKernels.backward)
    dL/dz  = dL/dx * (1 - (x / cap)^2)                        (d tanh(t)/dt = 1 - tanh(t)^2)
    dL/dhidden[R]  = scale * (dL/dz @ weight)
    dL/dweight    += dL/dz^T @ (scale * hidden[R])            (float32 accumulator)
    dL/dbias      += scale * sum_rows dL/dz

Two quantities are exposed:

- "sum", the scalar ``sum_n value_n``: the gradients are computed in the same pass (one forward
  and two gradient matmuls per chunk, as the unfused path) and the backward only scales them by
  the upstream gradient.
- "rows", ``value_n`` [N]: the gradient depends on a per-row upstream gradient g_n, so the
  backward recomputes each chunk's logits (one more matmul per chunk) with row_grad = g_n a_n and
  row_grad_lse = 2 g_n c_n lse_n; only lse [N] is kept from the forward.

PYNATIVE mode runs the chunk loop in Python around :class:`ChunkStep`, a Cell whose ``construct``
is compiled with ``ms.jit`` once per chunk shape (MindSpore's eager MatMul is about twice slower
than the compiled one on chunk-sized operands), inside a ``mindspore.common._Function``
(PyTorch-style autograd function) that keeps the gradients in its context and skips the gradient
work when no gradient is recorded. (A Cell with a custom ``bprop`` would also do, but MindSpore
2.9's PyNative executor copies every output of such a Cell, doubling the [V, H] weight gradient.)
GRAPH mode (and ``ms.jit``) uses :class:`LinearCrossEntropySum` / :class:`LinearCrossEntropyRows`,
Cells with a ``bprop`` whose chunk loop is a Python loop over static bounds that unrolls at compile
time; ``ops.depend`` makes each chunk wait for the previous one, so that the chunks run in order
and reuse their buffers instead of all chunks' logits being alive at once.

The weight gradient is accumulated in float32 by ``ops.assign_add``. When ``vocab_block`` < V (and
in PYNATIVE mode, where ``grad[a:b] += ...`` writes in place), the accumulation goes in blocks of
``vocab_block`` vocabulary rows so that each accumulation matmul has a [vocab_block, H] temporary
instead of a second [V, H] tensor; in GRAPH mode, where slice assignment is functional (it would
copy the whole accumulator per block), the chunk's [V, H] product is added whole. Half-precision
inputs are multiplied in float32 (MindSpore has no bfloat16 matmul on CPU): the weight is cast
once per call, the hidden states per chunk in PYNATIVE mode and once in GRAPH mode (the CPU slice
kernel has no bfloat16 version); all gradients are accumulated in float32 and returned in the
input dtypes.
"""

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from ms_xent._backends import dispatch
from ms_xent._backends._mindspore import (FirstOrderOnly, Function, check_first_order,
                                          executing_eagerly, gradients_recorded, tanh, total)

API = "linear_cross_entropy"
FLOAT32_BYTES = 4
_CELLS = {}


def live_row_buffers(logit_softcap):
    """How many float32 [chunk, V] buffers are alive at once in a chunk (for the memory budget):
    the logits and their gradient, plus two temporaries of the softcap derivative."""
    return 4 if logit_softcap > 0 else 2


def _float32(tensor):
    return tensor if tensor.dtype == ms.float32 else tensor.astype(ms.float32)


def _zloss_lse(lse, z_coef):
    """lse where the row has a z-loss factor, 0 elsewhere: rows that do not count add exactly 0
    to the loss and to the lse gradient, even when their logits are not finite.

    (``ops.zeros`` rather than ``ops.zeros_like``: the latter inside a Cell's forward makes
    MindSpore 2.9's GRAPH-mode autodiff fail with "The func graph is empty ... zeros_like".)"""
    return ops.select(z_coef != 0, lse, ops.zeros(lse.shape, lse.dtype))


def scaled_gradient(grad, scale, dtype):
    """``grad * scale`` in ``dtype``, multiplied in float32; an upstream gradient of exactly 1
    (checked in PYNATIVE mode) returns the stored gradient without a second buffer."""
    if executing_eagerly() and float(scale.asnumpy()) == 1.0:
        return grad if grad.dtype == dtype else grad.astype(dtype)
    return (grad.astype(ms.float32) * scale.astype(ms.float32)).astype(dtype)


class ChunkMath(nn.Cell):
    """The per-chunk arithmetic for one rows backend and one set of static options."""

    def __init__(self, rows_backend, ignore_index, label_smoothing, weighted, has_bias,
                 logit_softcap, logit_scale):
        super().__init__()
        self.has_bias = has_bias
        self.logit_softcap = float(logit_softcap)
        self.logit_scale = float(logit_scale)
        self.rows = dispatch.row_kernels(rows_backend, ignore_index, label_smoothing, weighted,
                                         False)
        self.logits_matmul = ops.MatMul(transpose_b=True)
        self.hidden_matmul = ops.MatMul()
        self.weight_matmul = ops.MatMul(transpose_a=True)

    def scaled_hidden(self, hidden_chunk):
        """scale * hidden_chunk in float32: the left factor of the logits, the right factor of
        the weight gradient."""
        hidden_chunk = _float32(hidden_chunk)
        if self.logit_scale != 1.0:
            hidden_chunk = hidden_chunk * self.logit_scale
        return hidden_chunk

    def logits(self, hidden_scaled, weight_f32, bias_f32):
        """The CE input x [c, V] float32."""
        logits = self.logits_matmul(hidden_scaled, weight_f32)
        if self.has_bias:
            logits = logits + bias_f32 * self.logit_scale
        if self.logit_softcap > 0:
            logits = tanh(logits * (1.0 / self.logit_softcap)) * self.logit_softcap
        return logits

    def values(self, logits, target, class_weight, row_coef, z_coef):
        """(value_n = a_n l_n + c_n lse_n^2, lse_n, lse_n masked for the z-loss)."""
        loss_rows, lse, _, _ = self.rows.forward(logits, target, class_weight)
        z_lse = _zloss_lse(lse, z_coef)
        return row_coef * loss_rows + z_coef * z_lse * z_lse, lse, z_lse

    def pre_softcap_grad(self, logits, grad_logits):
        """dL/dz from dL/dx, with x = cap * tanh(z / cap): dx/dz = 1 - (x / cap)^2."""
        if self.logit_softcap <= 0:
            return grad_logits
        ratio = logits * (1.0 / self.logit_softcap)
        return grad_logits * (1.0 - ratio * ratio)

    def grad_z(self, logits, target, class_weight, lse, row_grad, row_grad_lse):
        """dL/dz; the backend's shift state is given as (lse, 0), a valid (row_max, log_sum)."""
        shift = (lse, ops.zeros(lse.shape, ms.float32))
        grad_logits = self.rows.backward(logits, target, class_weight, shift, row_grad,
                                         row_grad_lse)
        return self.pre_softcap_grad(logits, grad_logits)

    def grad_hidden(self, grad_z, weight_f32):
        grad = self.hidden_matmul(grad_z, weight_f32)
        if self.logit_scale != 1.0:
            grad = grad * self.logit_scale
        return grad

    def add_bias_grad(self, grad_bias, grad_z):
        if self.has_bias:
            grad_bias = ops.assign_add(grad_bias, grad_z.sum(axis=0) * self.logit_scale)
        return grad_bias


class ChunkStep(ChunkMath):
    """One chunk, compiled (``ms.jit``) once per chunk shape; the PYNATIVE loop calls it.

    ``kind``: "forward" returns (values, lse); "forward_backward" also accumulates the gradient of
    sum_n value_n; "backward" accumulates the gradient for given per-row factors (``row_coef`` is
    then row_grad, ``z_coef`` is row_grad_lse, ``lse`` the forward's lse). The gradient kinds add
    into ``grad_bias`` in place and return (values, lse, the chunk's grad_hidden [c, H] float32); with
    ``blocked`` they also return dL/dz [c, V] for the caller's blockwise weight-gradient
    accumulation, else they add the chunk's [V, H] product into ``grad_weight`` in place.
    """

    def __init__(self, static, kind, blocked):
        super().__init__(*static)
        self.kind = kind
        self.blocked = blocked

    @ms.jit
    def construct(self, hidden_chunk, weight_f32, bias_f32, target, class_weight, row_coef,
                  z_coef, lse, grad_weight, grad_bias):
        hidden_scaled = self.scaled_hidden(hidden_chunk)
        logits = self.logits(hidden_scaled, weight_f32, bias_f32)
        values = row_coef
        if self.kind == "backward":
            row_grad, row_grad_lse = row_coef, z_coef
        else:
            values, lse, z_lse = self.values(logits, target, class_weight, row_coef, z_coef)
            if self.kind == "forward":
                return values, lse
            row_grad, row_grad_lse = row_coef, 2.0 * z_coef * z_lse
        grad_z = self.grad_z(logits, target, class_weight, lse, row_grad, row_grad_lse)
        grad_hidden = self.grad_hidden(grad_z, weight_f32)
        self.add_bias_grad(grad_bias, grad_z)
        if self.blocked:
            return values, lse, grad_hidden, grad_z
        ops.assign_add(grad_weight, self.weight_matmul(grad_z, hidden_scaled))
        return values, lse, grad_hidden


class BlockProduct(ChunkMath):
    """grad_z[:, first:last].T @ (scale * hidden_chunk): one block of a chunk's weight gradient
    (compiled once per block bounds and chunk shape)."""

    @ms.jit
    def construct(self, grad_z, hidden_chunk, first, last):
        return self.weight_matmul(grad_z[:, first:last], self.scaled_hidden(hidden_chunk))


def _cached_cell(cls, *args):
    """One Cell per (class, static arguments) for the PYNATIVE loop (a graph instantiates its
    Cells while it compiles, and compiles once)."""
    key = (cls.__name__,) + tuple(args)
    if key not in _CELLS:
        _CELLS[key] = cls(*args)
    return _CELLS[key]


def _zero_grads(hidden, weight, bias):
    """float32 accumulators of (grad_hidden, grad_weight, grad_bias). (Row assignment into a
    bfloat16 tensor is not supported on CPU; the gradients are cast once at the end.)"""
    return (ops.zeros(hidden.shape, ms.float32), ops.zeros(weight.shape, ms.float32),
            ops.zeros(bias.shape, ms.float32))


@constexpr
def _chunk_bounds(n_rows, chunk_rows):
    """((start, end), ...) of the chunks, a compile-time constant in GRAPH mode.

    (Computed in Python: the same ``min`` inside a Cell's forward and its bprop makes MindSpore
    2.9's GRAPH-mode autodiff fail with "The func graph is empty ... ms_min".)"""
    return tuple((start, min(start + chunk_rows, n_rows))
                 for start in range(0, n_rows, chunk_rows))


def _eager_pass(static, layout, kind, hidden, weight, bias, target, class_weight, row_coef,
                z_coef, lse=None):
    """The PYNATIVE chunk loop. Returns (values [N] or None, lse [N] or None, grads or None)."""
    chunk_rows, vocab_block = layout
    n_rows = hidden.shape[0]
    n_vocab = weight.shape[0]
    weight_f32 = _float32(weight)
    bias_f32 = _float32(bias)
    blocked = vocab_block < n_vocab
    step = _cached_cell(ChunkStep, static, kind, blocked)
    with_grads = kind != "forward"
    grads = _zero_grads(hidden, weight, bias) if with_grads else None
    grad_hidden, grad_weight, grad_bias = grads if with_grads else (None, None, None)
    values = ops.zeros((n_rows,), ms.float32) if kind != "backward" else None
    lse_rows = ops.zeros((n_rows,), ms.float32) if kind != "backward" else None
    block_product = _cached_cell(BlockProduct, *static) if blocked else None
    for start, end in _chunk_bounds(n_rows, chunk_rows):
        # Cast here: a half-precision row slice is a view, and MindSpore's CPU copy of views
        # (done when a view enters a compiled graph) does not support bfloat16.
        hidden_chunk = _float32(hidden[start:end])
        chunk_lse = lse[start:end] if lse is not None else row_coef[start:end]
        out = step(hidden_chunk, weight_f32, bias_f32, target[start:end], class_weight,
                   row_coef[start:end], z_coef[start:end], chunk_lse, grad_weight, grad_bias)
        if kind == "forward":
            values[start:end] = out[0]
            lse_rows[start:end] = out[1]
            continue
        if kind == "forward_backward":
            values[start:end] = out[0]
            lse_rows[start:end] = out[1]
        grad_hidden[start:end] = out[2]
        if blocked:
            for first, last in _chunk_bounds(n_vocab, vocab_block):
                grad_weight[first:last] += block_product(out[3], hidden_chunk, first, last)
    return values, lse_rows, grads


def _graph_loss_and_grads(math, chunk_rows, hidden, weight, bias, target, class_weight, row_coef,
                          z_coef):
    """The GRAPH-mode chunk loop of "sum" (unrolled; chunks ordered by ops.depend): (loss, lse,
    grad_hidden, grad_weight, grad_bias)."""
    hidden_f32 = _float32(hidden)  # (CPU StridedSlice has no bfloat16 kernel)
    weight_f32 = _float32(weight)
    bias_f32 = _float32(bias)
    grad_hidden, grad_weight, grad_bias = _zero_grads(hidden, weight, bias)
    loss_total = ops.zeros((), ms.float32)
    lse_rows = ops.zeros((hidden.shape[0],), ms.float32)
    for start, end in _chunk_bounds(hidden.shape[0], chunk_rows):
        chunk_input = ops.depend(hidden_f32, (grad_hidden, grad_weight, grad_bias, total))
        hidden_scaled = math.scaled_hidden(chunk_input[start:end])
        logits = math.logits(hidden_scaled, weight_f32, bias_f32)
        chunk_target = target[start:end]
        chunk_row_coef = row_coef[start:end]
        values, lse, z_lse = math.values(logits, chunk_target, class_weight, chunk_row_coef,
                                         z_coef[start:end])
        loss_total = loss_total + values.sum()
        lse_rows[start:end] = lse
        grad_z = math.grad_z(logits, chunk_target, class_weight, lse, chunk_row_coef,
                             2.0 * z_coef[start:end] * z_lse)
        grad_hidden[start:end] = math.grad_hidden(grad_z, weight_f32)
        grad_bias = math.add_bias_grad(grad_bias, grad_z)
        grad_weight = ops.assign_add(grad_weight, math.weight_matmul(grad_z, hidden_scaled))
    return loss_total, lse_rows, grad_hidden, grad_weight, grad_bias


def no_input_grads(target, class_weight, row_coef, z_coef):
    """The zero gradients a bprop returns for the non-differentiated inputs."""
    return tuple(ops.zeros(tensor.shape, tensor.dtype)
                 for tensor in (target, class_weight, row_coef, z_coef))


class LinearCrossEntropySum(ChunkMath):
    """GRAPH-mode "sum": outputs (loss, lse, grad_hidden, grad_weight float32, grad_bias float32);
    differentiable w.r.t. hidden, weight and bias through the loss."""

    def __init__(self, static, chunk_rows):
        super().__init__(*static)
        self.chunk_rows = chunk_rows
        self.first_order_only = FirstOrderOnly(API)

    def construct(self, hidden, weight, bias, target, class_weight, row_coef, z_coef):
        return _graph_loss_and_grads(self, self.chunk_rows, hidden, weight, bias, target,
                                     class_weight, row_coef, z_coef)

    def bprop(self, hidden, weight, bias, target, class_weight, row_coef, z_coef, out, dout):
        scale = dout[0]
        grads = (scaled_gradient(out[2], scale, hidden.dtype),
                 scaled_gradient(out[3], scale, weight.dtype),
                 scaled_gradient(out[4], scale, bias.dtype))
        return self.first_order_only(*grads) + no_input_grads(target, class_weight, row_coef, z_coef)


class LinearCrossEntropyRows(ChunkMath):
    """GRAPH-mode "rows": outputs (values [N], lse [N]); the bprop recomputes the logits."""

    def __init__(self, static, chunk_rows):
        super().__init__(*static)
        self.chunk_rows = chunk_rows
        self.first_order_only = FirstOrderOnly(API)

    def construct(self, hidden, weight, bias, target, class_weight, row_coef, z_coef):
        hidden_f32 = _float32(hidden)
        weight_f32 = _float32(weight)
        bias_f32 = _float32(bias)
        n_rows = hidden.shape[0]
        values = ops.zeros((n_rows,), ms.float32)
        lse_rows = ops.zeros((n_rows,), ms.float32)
        for start, end in _chunk_bounds(n_rows, self.chunk_rows):
            chunk_input = ops.depend(hidden_f32, lse_rows)
            logits = self.logits(self.scaled_hidden(chunk_input[start:end]), weight_f32,
                                 bias_f32)
            chunk_values, lse, _ = self.values(logits, target[start:end], class_weight,
                                               row_coef[start:end], z_coef[start:end])
            values[start:end] = chunk_values
            lse_rows[start:end] = lse
        return values, lse_rows

    def bprop(self, hidden, weight, bias, target, class_weight, row_coef, z_coef, out, dout):
        # No module-level helper that the forward also uses is called here: sharing one between
        # a Cell's forward and its bprop can make MindSpore 2.9's GRAPH-mode autodiff fail ("The
        # func graph is empty").
        lse = out[1]
        upstream = dout[0]
        hidden_f32 = hidden.astype(ms.float32)
        weight_f32 = weight.astype(ms.float32)
        bias_f32 = bias.astype(ms.float32)
        row_grad = upstream * row_coef
        row_grad_lse = 2.0 * upstream * z_coef * ops.select(z_coef != 0, lse,
                                                             ops.zeros(lse.shape, ms.float32))
        grad_hidden, grad_weight, grad_bias = _zero_grads(hidden, weight, bias)
        for start, end in _chunk_bounds(hidden.shape[0], self.chunk_rows):
            chunk_input = ops.depend(hidden_f32, (grad_hidden, grad_weight, grad_bias))
            hidden_scaled = self.scaled_hidden(chunk_input[start:end])
            logits = self.logits(hidden_scaled, weight_f32, bias_f32)
            grad_z = self.grad_z(logits, target[start:end], class_weight, lse[start:end],
                                 row_grad[start:end], row_grad_lse[start:end])
            grad_hidden[start:end] = self.grad_hidden(grad_z, weight_f32)
            grad_bias = self.add_bias_grad(grad_bias, grad_z)
            grad_weight = ops.assign_add(grad_weight,
                                         self.weight_matmul(grad_z, hidden_scaled))
        return self.first_order_only(grad_hidden.astype(hidden.dtype),
                                     grad_weight.astype(weight.dtype),
                                     grad_bias.astype(bias.dtype)) + no_input_grads(
                                         target, class_weight, row_coef, z_coef)


class _EagerSum(Function):
    """PYNATIVE "sum": the gradients wait in the context until the backward scales them."""

    @staticmethod
    def forward(ctx, static, layout, with_grads, hidden, weight, bias, target, class_weight,
                row_coef, z_coef):
        kind = "forward_backward" if with_grads else "forward"
        values, lse, grads = _eager_pass(static, layout, kind, hidden, weight, bias, target,
                                         class_weight, row_coef, z_coef)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
        return total(values), lse

    @staticmethod
    def backward(ctx, dout, _):
        check_first_order(API)
        grads, ctx.grads = ctx.grads, None
        scaled = tuple(scaled_gradient(grad, dout, dtype) for grad, dtype in zip(grads, ctx.dtypes))
        return (None, None, None) + scaled + (None, None, None, None)


class _EagerRows(Function):
    """PYNATIVE "rows": keeps the inputs and lse; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, static, layout, hidden, weight, bias, target, class_weight, row_coef,
                z_coef):
        values, lse, _ = _eager_pass(static, layout, "forward", hidden, weight, bias, target,
                                     class_weight, row_coef, z_coef)
        ctx.static = static
        ctx.layout = layout
        ctx.inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef, lse)
        return values, lse

    @staticmethod
    def backward(ctx, dout, _):
        check_first_order(API)
        (hidden, weight, bias, target, class_weight, row_coef, z_coef, lse), ctx.inputs = \
            ctx.inputs, None
        row_grad = dout * row_coef
        row_grad_lse = 2.0 * dout * z_coef * _zloss_lse(lse, z_coef)
        _, _, grads = _eager_pass(ctx.static, ctx.layout, "backward", hidden, weight, bias,
                                  target, class_weight, row_grad, row_grad_lse, lse)
        grad_hidden, grad_weight, grad_bias = grads
        return (None, None, grad_hidden.astype(hidden.dtype), grad_weight.astype(weight.dtype),
                grad_bias.astype(bias.dtype), None, None, None, None)


def linear_cross_entropy_sum(static, layout, hidden, weight, bias, target, class_weight,
                             row_coef, z_coef):
    """(float32 0-d ``sum_n row_coef_n l_n + z_coef_n lse_n^2``, differentiable w.r.t. hidden,
    weight and bias; float32 [N] lse, not differentiated).

    ``static`` = (rows_backend, ignore_index, label_smoothing, weighted, has_bias, logit_softcap,
    logit_scale),
    ``layout`` = (chunk_rows, vocab_block). Tensor inputs: hidden [N, H], weight [V, H], bias [V]
    (not read when has_bias is False), target [N] int, class_weight [V] float32, row_coef [N] and
    z_coef [N] float32 (not differentiated).
    """
    inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef)
    if executing_eagerly():
        return _EagerSum.apply(static, layout, gradients_recorded(), *inputs)
    loss_total, lse, _, _, _ = LinearCrossEntropySum(static, layout[0])(*inputs)
    return loss_total, lse


def linear_cross_entropy_rows(static, layout, hidden, weight, bias, target, class_weight,
                              row_coef, z_coef):
    """(float32 [N] ``row_coef_n l_n + z_coef_n lse_n^2``, float32 [N] lse not differentiated);
    arguments as :func:`linear_cross_entropy_sum`."""
    inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef)
    if executing_eagerly():
        return _EagerRows.apply(static, layout, *inputs)
    return LinearCrossEntropyRows(static, layout[0])(*inputs)
