"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` without the [N, V] logits.

For a language model's head the logits are the largest activation (N = 8192 tokens and a 128k
vocabulary make 4 GiB in float32, and their gradient as much again). :func:`linear_cross_entropy`
never holds them. Two implementations (chosen in :mod:`ms_xent._backends.dispatch`):

- ``cpu_kernel`` (the CPU default): one C++ kernel
  (:mod:`ms_xent._backends.cpu.linear_cross_entropy_op`) walks over the rows in blocks of R rows
  over the whole vocabulary with oneDNN's matrix products (three per block); at most one [R, V]
  block of logits exists.
- ``matmul_chunks`` (every other device, ``MS_XENT_BACKEND=composed``, or a MindSpore without
  oneDNN): rows in chunks of MindSpore MatMul + the rows backend's per-row cross-entropy
  (:mod:`ms_xent._backends.linear_chunks`): per chunk the logits, the per-row cross-entropy
  forward, and at once the chunk's gradient w.r.t. the hidden states and its contribution to the
  gradient w.r.t. the weight and bias. At most one chunk of logits is alive at a time.

This module validates the arguments, folds the reduction, mask, class weights and z-loss into
per-row factors, chooses the block or chunk size, and calls the backend.
"""

import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.ops import constexpr

from ms_xent._backends import dispatch, linear_chunks
from ms_xent._backends._mindspore import (counted_rows, executing_eagerly, known, reshape,
                                          safe_divide, total)
from ms_xent._backends.cpu import linear_cross_entropy_op as cpu_linear
from ms_xent._backends.linear_chunks import FLOAT32_BYTES, live_row_buffers
from ms_xent.ops.validation import (FLOAT_TYPES, INDEX_TYPES, check_ignore_index,
                                    check_logit_map, check_option_values, check_target_values,
                                    check_tensors, check_weight_values, check_zloss_scale,
                                    rank_of)

API = "linear_cross_entropy"
MIB = 1 << 20
# Automatic chunking: the chunk's float32 working set (logits, their gradient, temporaries) gets
# this share of the size the full float32 logits would have, within [MIN_WORKSPACE,
# MAX_WORKSPACE], but at least MIN_CHUNK_ROWS rows while that fits MAX_WORKSPACE: every chunk
# re-reads the weight and re-writes the [V, H] weight-gradient accumulator, a cost independent of
# the chunk's rows, so that fewer rows per chunk cost time (measured: about 1.7x the unfused time
# with 128-row chunks at V = 128256, against 1.1x with 256 or more). Each of the two
# [vocab_block, H] temporaries of the weight-gradient accumulation gets at most a quarter of the
# chunk's working set and MAX_BLOCK_BYTES (smaller blocks cost little time: +2% measured).
WORKSPACE_FRACTION = 1.0 / 16
MIN_WORKSPACE = 64 * MIB
MAX_WORKSPACE = 256 * MIB
MIN_CHUNK_ROWS = 256
MAX_BLOCK_BYTES = 32 * MIB


# CPU kernel (row blocks over the whole vocabulary): the block's buffers (float32 logits [R, V],
# for half types a float32 [R, H] block of d hidden and, for float16, the float32 [R, H] hidden
# block) and the d hidden output [N, H] together get ROW_BLOCK_FRACTION of the size of the full
# float32 logits (the block within [MIN_BLOCK_WORKSPACE, MAX_BLOCK_WORKSPACE]), but the block
# has at least MIN_ROW_BLOCK rows: each block streams the weight twice and the [V, H] weight
# gradient once more, so fewer rows per block cost time (measured at 8192 x 1024 x 32000 float32:
# 64-row blocks 1.2-1.8x the time of 262-row blocks, 128 rows 1.0-1.2x).
ROW_BLOCK_FRACTION = 1.0 / 32
MIN_BLOCK_WORKSPACE = 1 * MIB
MAX_BLOCK_WORKSPACE = 256 * MIB
MIN_ROW_BLOCK = 128


@constexpr
def _check_batch_dims(api, hidden_shape, target_shape, mask_shape, shift):
    """hidden [..., H] with target [...] (and input_mask [...]) of the same leading shape; shift
    needs a sequence axis (target of rank >= 1). Returns the flat row count."""
    rank_of(api, "target", target_shape)
    if rank_of(api, "hidden", hidden_shape) < 2:
        raise ValueError(f"{api}: `hidden` must be [..., H] with at least 2 dims, got shape "
                         f"{tuple(hidden_shape)}")
    if tuple(target_shape) != tuple(hidden_shape[:-1]):
        raise ValueError(f"{api}: `target` must have shape {tuple(hidden_shape[:-1])} (one class "
                         f"index per row of `hidden`), got {tuple(target_shape)}")
    if mask_shape is not None and tuple(mask_shape) != tuple(target_shape):
        raise ValueError(f"{api}: `input_mask` must have shape {tuple(target_shape)}, got "
                         f"{tuple(mask_shape)}")
    if not isinstance(shift, (bool, np.bool_)):
        raise TypeError(f"{api}: `shift` must be a bool, got {shift!r}")
    rows = 1
    for dim in hidden_shape[:-1]:
        rows = rows * dim if known(dim) else -1
    return rows


@constexpr
def _check_outputs(api, return_z_loss, return_lse):
    for name, value in (("return_z_loss", return_z_loss), ("return_lse", return_lse)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{api}: `{name}` must be a bool, got {value!r}")
    return True


@constexpr
def _check_inputs(api, hidden_shape, hidden_dtype, weight_shape, weight_dtype, target_shape,
                  target_dtype, bias_shape, bias_dtype, class_weight_shape, class_weight_dtype,
                  mask_shape):
    """Static checks of ranks, shapes and dtypes (compile-time errors in GRAPH mode)."""
    if hidden_dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `hidden` must be float16, bfloat16 or float32, got {hidden_dtype}")
    if weight_dtype != hidden_dtype:
        raise TypeError(f"{api}: `weight` must have the dtype of `hidden` ({hidden_dtype}), got "
                        f"{weight_dtype}")
    if rank_of(api, "weight", weight_shape) != 2:
        raise ValueError(f"{api}: `weight` must be 2-D [V, H] (lm_head layout), got shape "
                         f"{tuple(weight_shape)}")
    n_rows, n_hidden = hidden_shape
    n_vocab = weight_shape[0]
    if not all(known(dim) for dim in (n_rows, n_hidden, n_vocab, weight_shape[1])):
        raise ValueError(f"{api}: needs static shapes (the chunk loop is unrolled at compile "
                         f"time), got hidden {tuple(hidden_shape)} and weight "
                         f"{tuple(weight_shape)}")
    if weight_shape[1] != n_hidden:
        raise ValueError(f"{api}: `weight` [V, H] must have H = {n_hidden} columns like `hidden`, "
                         f"got shape {tuple(weight_shape)}")
    if n_vocab <= 0:
        raise ValueError(f"{api}: `weight` must have V > 0 rows, got shape {tuple(weight_shape)}")
    if target_dtype not in INDEX_TYPES:
        raise TypeError(f"{api}: `target` must be int32 or int64 class indices, got "
                        f"{target_dtype}")
    if rank_of(api, "target", target_shape) != 1 or tuple(target_shape) != (n_rows,):
        raise ValueError(f"{api}: `target` must have shape ({n_rows},) (one class index per row "
                         f"of `hidden`), got {tuple(target_shape)}")
    if bias_shape is not None:
        if bias_dtype != hidden_dtype:
            raise TypeError(f"{api}: `bias` must have the dtype of `hidden` ({hidden_dtype}), got "
                            f"{bias_dtype}")
        if rank_of(api, "bias", bias_shape) != 1 or tuple(bias_shape) != (n_vocab,):
            raise ValueError(f"{api}: `bias` must have shape ({n_vocab},), got "
                             f"{tuple(bias_shape)}")
    if class_weight_shape is not None:
        if class_weight_dtype not in FLOAT_TYPES:
            raise TypeError(f"{api}: `class_weight` must be a float tensor, got "
                            f"{class_weight_dtype}")
        if (rank_of(api, "class_weight", class_weight_shape) != 1
                or tuple(class_weight_shape) != (n_vocab,)):
            raise ValueError(f"{api}: `class_weight` must have shape ({n_vocab},) (one per class), "
                             f"got {tuple(class_weight_shape)}")
    if mask_shape is not None and (rank_of(api, "input_mask", mask_shape) != 1
                                   or tuple(mask_shape) != (n_rows,)):
        raise ValueError(f"{api}: `input_mask` must have shape ({n_rows},), got "
                         f"{tuple(mask_shape)}")
    return True


@constexpr
def _check_transform(api, logit_softcap, logit_scale, reduction, return_per_token):
    check_logit_map(api, logit_softcap, logit_scale)
    if not isinstance(return_per_token, (bool, np.bool_)):
        raise TypeError(f"{api}: `return_per_token` must be a bool, got {return_per_token!r}")
    if return_per_token and reduction == "none":
        raise ValueError(f"{api}: return_per_token=True returns (numerator, denominator) of the "
                         f"'mean' loss; it cannot be combined with reduction 'none'")
    return True


@constexpr
def chunk_layout(api, n_rows, n_hidden, n_vocab, logit_softcap, chunk_size):
    """(chunk_rows, vocab_block) of the loop; ``chunk_size`` (rows) overrides the budget.

    The chunk's float32 working set (``live_row_buffers`` buffers of [chunk_rows, V]) is
    WORKSPACE_FRACTION of the size of the full float32 logits (the dtype the logits are computed
    in), clamped to [MIN_WORKSPACE, MAX_WORKSPACE], with at least MIN_CHUNK_ROWS rows where
    MAX_WORKSPACE allows; a given ``chunk_size`` overrides it. Each [vocab_block, H] float32
    temporary of the blockwise weight-gradient accumulation fits a quarter of the chunk's working
    set and MAX_BLOCK_BYTES (equal blocks; one block when the whole accumulation fits).
    """
    row_bytes = n_vocab * FLOAT32_BYTES * live_row_buffers(logit_softcap)
    if chunk_size is None:
        budget = n_rows * n_vocab * FLOAT32_BYTES * WORKSPACE_FRACTION
        budget = int(min(max(budget, MIN_WORKSPACE), MAX_WORKSPACE))
        chunk_rows = min(max(budget // row_bytes, MIN_CHUNK_ROWS), MAX_WORKSPACE // row_bytes)
    else:
        _check_chunk_size(api, chunk_size)
        chunk_rows = int(chunk_size)
    block_bytes = min(chunk_rows * row_bytes // 4, MAX_BLOCK_BYTES)
    chunk_rows = max(1, min(chunk_rows, n_rows))
    n_blocks = -(-n_vocab // max(1, block_bytes // (n_hidden * FLOAT32_BYTES)))
    vocab_block = -(-n_vocab // n_blocks)
    return int(chunk_rows), int(vocab_block)


@constexpr
def row_block_layout(api, n_rows, n_hidden, n_vocab, dtype, chunk_size):
    """Rows per block of the CPU kernel.

    Automatic: the block's buffers take ROW_BLOCK_FRACTION of the size of the full float32
    logits less the size of the d hidden output, clamped to [MIN_BLOCK_WORKSPACE,
    MAX_BLOCK_WORKSPACE], with at least MIN_ROW_BLOCK rows. A given ``chunk_size`` is the number
    of rows per block.
    """
    if chunk_size is not None:
        _check_chunk_size(api, chunk_size)
        return int(max(1, min(n_rows, chunk_size)))
    row_bytes = n_vocab * FLOAT32_BYTES
    dtype_name = str(dtype)
    itemsize = FLOAT32_BYTES if dtype_name == "Float32" else 2
    if dtype_name == "BFloat16":
        row_bytes += n_hidden * FLOAT32_BYTES
    elif dtype_name == "Float16":
        row_bytes += 2 * n_hidden * FLOAT32_BYTES
    budget = (n_rows * n_vocab * FLOAT32_BYTES * ROW_BLOCK_FRACTION
              - n_rows * n_hidden * itemsize)
    budget = min(max(budget, MIN_BLOCK_WORKSPACE), MAX_BLOCK_WORKSPACE)
    return int(max(1, min(n_rows, max(MIN_ROW_BLOCK, budget // row_bytes))))


def _check_chunk_size(api, chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"{api}: `chunk_size` must be a positive int (rows per chunk) or "
                         f"None, got {chunk_size!r}")


@constexpr
def _linear_backend():
    """(implementation, rows backend) for this call (a constant in GRAPH mode)."""
    return dispatch.linear_cross_entropy_backend(cpu_linear.onednn_library() is not None)


def _shape_or_none(tensor):
    return None if tensor is None else tensor.shape


def _dtype_or_none(tensor):
    return None if tensor is None else tensor.dtype


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, class_weight=None,
                         label_smoothing=0.0, lse_square_scale_for_zloss=0.0, logit_softcap=0.0,
                         logit_scale=1.0, reduction="mean", input_mask=None,
                         return_per_token=False, chunk_size=None, shift=False,
                         return_z_loss=False, return_lse=False):
    r"""Cross-entropy of the logits ``hidden @ weight.T + bias``, computed without holding them.

    The logits of row n are

    .. math::
        x_n = \mathrm{cap} \cdot \tanh\left(\frac{\mathrm{scale}\,(h_n W^\top + b)}{\mathrm{cap}}
        \right)\quad(\text{or } \mathrm{scale}\,(h_n W^\top + b) \text{ when cap} = 0)

    and the loss is that of :func:`ms_xent.ops.cross_entropy_loss` on them, with the z-loss added.
    With :math:`l_n` the per-row cross-entropy (class weights, label smoothing, 0 for ignored rows),
    :math:`m_n = 1\{y_n \ne \text{ignore\_index}\}`, :math:`\rho_n = w[y_n] m_n` and
    :math:`r_n` the input mask (1 without one), the loss and the z-loss of a row are
    :math:`r_n l_n` and :math:`z_n = s\,r_n m_n\,\mathrm{lse}_n^2` (the z-loss is not class-weighted),
    and

    .. math::
        \text{mean} = \frac{\sum_n r_n l_n}{\sum_n r_n \rho_n} + \frac{\sum_n z_n}{\sum_n r_n m_n},
        \quad \text{sum} = \sum_n (r_n l_n + z_n), \quad \text{none} = r_n l_n + z_n.

    Without class weights both denominators are the number of counted rows (times the mask) and
    this is exactly ``cross_entropy_loss(...)`` loss + zloss. With "mean" and a zero denominator
    (every row ignored or masked out) that part and its gradient are 0.

    For "mean", "sum" and ``return_per_token`` the gradients are computed during the forward
    (in PYNATIVE mode only while autodiff records; a plain call computes the loss alone) and the
    backward only scales them by the upstream gradient. For "none" the backward recomputes the
    logits with the per-row upstream gradients. Second-order differentiation (the gradient of a
    gradient) raises NotImplementedError.

    CPU kernel: rows in blocks of R over the whole vocabulary; per block, the logits (one matrix
    product), each row's loss and gradient in place, the block's rows of d loss / d hidden (a
    second product) and its contribution to d loss / d weight (a third, accumulated over the
    blocks): three matrix products, as the unfused path (oneDNN, every core; bfloat16 products with
    float32 accumulation for bfloat16 inputs, whose logits gradient is rounded to bfloat16 as their
    operand like the unfused path's bfloat16 gradient; float32 otherwise). Every sum and every
    gradient is accumulated in float32 (for half inputs the weight gradient in a float32 [V, H]
    buffer, rounded once at the end), so there is no ``accum_dtype`` choice to make. Each row's
    log-sum-exp is split at its maximum, lse = M + log1p(rest), and the target's gradient
    -(1 - p_y) is formed without cancellation: losses of confident rows (p_y close to 1) and of
    logits offset by huge constants keep float32 relative precision. Chunked path (any device
    other than CPU, ``MS_XENT_BACKEND=composed``, or a MindSpore without oneDNN): rows in chunks of
    MindSpore MatMul in float32 (the logits, the rows backend's per-row cross-entropy forward and
    backward, the chunk's rows of d loss / d hidden and its float32 contribution to d loss /
    d weight); in PYNATIVE mode each chunk is a small graph compiled on first use for each chunk
    shape; in GRAPH mode the chunk loop unrolls at compile time. Both need static shapes in GRAPH
    mode.

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 hidden states (e.g. [N, H] or [B, T, H]; the
            leading dims are flattened).
        weight: [V, H] output-layer weight in the lm_head layout (MindFormers' ``lm_head.weight``),
            same dtype as ``hidden``.
        target: [...] int32 / int64 class indices in [0, V) or ``ignore_index``, the leading shape
            of ``hidden``.
        bias: optional [V] bias, same dtype as ``hidden``; default None (no bias).
        ignore_index: int, default -100; rows with this target contribute nothing (no loss, no
            gradient, not counted in the "mean" denominators).
        class_weight: optional [V] finite class weights of any sign (not differentiated); default
            None (all 1).
        label_smoothing: float eps in [0, 1), default 0.0.
        lse_square_scale_for_zloss: z-loss scale s, any finite s >= 0, default 0.0; the z-loss is
            added to the loss.
        logit_softcap: float, default 0.0; cap > 0 applies Gemma-style ``cap * tanh(logits / cap)``;
            0 disables it.
        logit_scale: float, default 1.0; non-zero factor applied to ``hidden @ weight.T + bias``
            before the softcap.
        reduction: "mean" (default), "sum" or "none" ("none": the shape of ``target``).
        input_mask: optional (default None: all 1) row weights of any real or bool dtype, the shape
            of ``target`` (0: the row does not count; it multiplies the row's contribution and its
            share of the denominators). Not differentiated.
        return_per_token: bool, default False; return ``(numerator, denominator)`` = (sum_n r_n l_n
            + z part, sum_n r_n rho_n) of the "mean" loss, so that gradient accumulation or pipeline
            stages can sum before dividing (the z part is sum_n z_n times sum r rho / sum r m, so
            that numerator / denominator is the "mean" loss). Only the numerator is differentiable.
        chunk_size: how many logits are alive at once, as rows of V logits: None chooses it.
            CPU kernel: rows per block; automatically the block's buffers and the d hidden
            output take 1/32 of the size of the full float32 logits (the block between 1 MiB and
            256 MiB), at least 128 rows. Chunked path:
            ``chunk_size`` rows per chunk; automatically the chunk's float32 working set (logits
            and their gradient) is about 1/16 of the size of the full float32 logits, between
            64 MiB and 256 MiB, with at least 256 rows where 256 MiB allows, and the
            weight-gradient accumulation is split into vocabulary blocks whose [block, H] float32
            temporaries are at most a quarter of that and 32 MiB. Smaller chunks or blocks use
            less memory and run slower.
        shift: bool, default False; causal-LM shift (Cut Cross-Entropy's ``shift``): the hidden
            state at position t of a sequence (the last axis of ``target``) is scored against
            ``target`` at t + 1, and ``input_mask`` at t + 1 applies to it; the last position of
            each sequence has no label and is ignored (it counts nowhere). ``hidden`` is not copied:
            the targets (and the mask) are shifted, as int64, and the last position's row is still
            computed and discarded (1/T of the work). A 1-D ``target`` is one sequence.
        return_z_loss: bool, default False; also return the z-loss part of the loss (already
            included in it), reduced as the loss is ("none": per row; ``return_per_token``: its part
            of the numerator), not differentiated (for logging).
        return_lse: bool, default False; also return the per-row log-sum-exp of the logits (float32,
            the shape of ``target``; computed for every row, ignored or not), not differentiated.

    Returns:
        float32: 0-d for "mean" / "sum", the shape of ``target`` for "none", or
        ``(numerator, denominator)``, both 0-d; followed by the z-loss when ``return_z_loss`` and
        the lse when ``return_lse`` (as a flat tuple: ``(loss, z_loss, lse)``,
        ``(numerator, denominator, z_loss)``, ...). Differentiable w.r.t. ``hidden``, ``weight``
        and ``bias`` (gradients in their dtypes; the weight and bias gradients are accumulated in
        float32).

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes, options, and (in
        PYNATIVE mode) target values outside [0, V) or non-finite class weights. In GRAPH mode an
        out-of-range target makes the kernel raise RuntimeError at run time.
        NotImplementedError for the gradient of a gradient.
    """
    return linear_cross_entropy_impl(
        API, hidden, weight, target, bias, ignore_index, class_weight, label_smoothing,
        lse_square_scale_for_zloss, logit_softcap, logit_scale, reduction, input_mask,
        return_per_token, chunk_size, shift=shift, return_z_loss=return_z_loss,
        return_lse=return_lse)


def _shifted(values, fill):
    """values[..., t + 1] at t along the last axis, ``fill`` at the last position."""
    last = ops.full(values.shape[:-1] + (1,), fill, dtype=values.dtype)
    return ops.concat((values[..., 1:], last), axis=-1)


def linear_cross_entropy_impl(api, hidden, weight, target, bias, ignore_index, class_weight,
                              label_smoothing, lse_square_scale_for_zloss, logit_softcap,
                              logit_scale, reduction, input_mask, return_per_token, chunk_size,
                              denominator_guard=0.0, shift=False, return_z_loss=False,
                              return_lse=False):
    """:func:`linear_cross_entropy` with the API name for error messages and a constant added to
    the "mean" denominators (``LinearCrossEntropyLoss`` adds MindFormers' 1e-8)."""
    if executing_eagerly():
        check_tensors(api, ("hidden", "weight", "target", "bias", "class_weight", "input_mask"),
                      (hidden, weight, target, bias, class_weight, input_mask))
    n_rows = _check_batch_dims(api, hidden.shape, target.shape, _shape_or_none(input_mask),
                               shift)
    _check_outputs(api, return_z_loss, return_lse)
    batch_shape = target.shape
    if shift:
        target = _shifted(target.astype(ms.int64), ignore_index)
        if input_mask is not None:
            input_mask = _shifted(input_mask, 0)
    if len(hidden.shape) != 2:
        hidden = reshape(hidden, (n_rows, hidden.shape[-1]))
        target = target.reshape((n_rows,))
        if input_mask is not None:
            input_mask = input_mask.reshape((n_rows,))
    _check_inputs(api, hidden.shape, hidden.dtype, weight.shape, weight.dtype, target.shape,
                  target.dtype, _shape_or_none(bias), _dtype_or_none(bias),
                  _shape_or_none(class_weight), _dtype_or_none(class_weight),
                  _shape_or_none(input_mask))
    check_option_values(api, reduction, label_smoothing, 0.0)
    check_zloss_scale(api, lse_square_scale_for_zloss)
    check_ignore_index(api, ignore_index)
    _check_transform(api, logit_softcap, logit_scale, reduction, return_per_token)
    n_rows, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    if executing_eagerly():
        check_target_values(api, target, n_vocab, ignore_index)
        if class_weight is not None:
            check_weight_values(api, class_weight, "class_weight")

    weighted = class_weight is not None
    class_weight = (class_weight.astype(ms.float32) if weighted
                    else ops.ones((n_vocab,), ms.float32))
    has_bias = bias is not None
    if not has_bias:
        bias = ops.zeros((n_vocab,), hidden.dtype)

    counted = counted_rows(target, ignore_index)
    safe_target = ops.select(counted, target, ops.zeros_like(target))
    row_coef = (ops.ones((n_rows,), ms.float32) if input_mask is None
                else input_mask.astype(ms.float32))
    row_weight = ops.gather(class_weight, safe_target, 0) * counted.astype(ms.float32) * row_coef
    z_weight = counted.astype(ms.float32) * row_coef
    z_coef = lse_square_scale_for_zloss * z_weight

    static = (int(ignore_index), float(label_smoothing), weighted, has_bias, float(logit_softcap),
              float(logit_scale))
    implementation, rows_backend = _linear_backend()
    use_kernel = implementation == dispatch.CPU_KERNEL
    if use_kernel:
        layout = row_block_layout(api, n_rows, n_hidden, n_vocab, hidden.dtype, chunk_size)
        backend = cpu_linear
    else:
        layout = chunk_layout(api, n_rows, n_hidden, n_vocab, logit_softcap, chunk_size)
        static = (rows_backend,) + static
        backend = linear_chunks
    inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef)

    if reduction == "none":
        loss, lse = backend.linear_cross_entropy_rows(static, layout, *inputs)
        loss = loss.reshape(batch_shape)
        z_scale = 1.0
    else:
        denominator = ops.stop_gradient(total(row_weight)) + denominator_guard
        z_denominator = ops.stop_gradient(total(z_weight)) + denominator_guard
        if return_per_token:
            z_scale = safe_divide(denominator, z_denominator)
        elif reduction == "mean":
            row_coef = safe_divide(row_coef, denominator)
            z_scale = safe_divide(ops.ones((), ms.float32), z_denominator)
        else:
            z_scale = 1.0
        z_coef = z_coef * z_scale
        inputs = (hidden, weight, bias, target, class_weight, row_coef, z_coef)
        loss, lse = backend.linear_cross_entropy_sum(static, layout, *inputs)
        if return_per_token:
            loss = (loss, denominator)
    extras = ()
    if return_z_loss:
        z_lse = ops.select(z_weight != 0, lse, ops.zeros_like(lse))
        z_rows = ops.stop_gradient(lse_square_scale_for_zloss * z_weight * z_lse * z_lse)
        extras += ((z_rows * z_scale).reshape(batch_shape) if reduction == "none"
                   else total(z_rows) * z_scale,)
    if return_lse:
        extras += (ops.stop_gradient(lse).reshape(batch_shape),)
    if not extras:
        return loss
    return (loss if isinstance(loss, tuple) else (loss,)) + extras
