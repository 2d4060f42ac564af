"""Functional API of the vocabulary-parallel cross-entropy (logits split over the classes).

:func:`vocab_parallel_cross_entropy_rows` is :func:`ms_xent.ops.cross_entropy_rows` for logits
whose class axis is split over the ranks of a communication group (tensor / model parallelism,
as the output of a column-parallel lm_head): every rank passes its slice of the logits and the
same targets, and gets the per-row values of the whole vocabulary; the gradient each rank gets
is its slice of the single-device gradient. The math is in :mod:`ms_xent._backends.vocab_parallel`;
it runs on the rows backend of :mod:`ms_xent._backends.dispatch` (any device).
"""

import functools

import mindspore as ms
from mindspore import ops
from mindspore.communication import GlobalComm, get_group_size, get_rank
from mindspore.ops import constexpr

from ms_xent._backends import dispatch
from ms_xent._backends._mindspore import executing_eagerly
from ms_xent._backends.vocab_parallel import NOT_OWNED, VocabParallelRows
from ms_xent.ops.validation import (check_ignore_index, check_ignore_index_for_probabilities,
                                    check_logits_and_target, check_option_values,
                                    check_target_values, check_tensors, class_weight)

API = "vocab_parallel_cross_entropy_rows"


@constexpr
def _shard_layout(group, shard_classes, vocab_start, num_classes):
    """(group, world_size, vocab_start, num_classes) with the defaults filled in and checked.

    The default group is the world group when communication is initialised, else a single
    process (world_size 1, no collective). The default slice of rank r is [r C_r, (r+1) C_r)
    and the default vocabulary size R C_r (equal slices).
    """
    if group is None and not GlobalComm.INITED:
        world_size, rank = 1, 0
    else:
        if not GlobalComm.INITED:
            raise RuntimeError(f"{API}: `group` {group!r} was given but mindspore.communication "
                               f"is not initialised (call mindspore.communication.init() first)")
        group = GlobalComm.WORLD_COMM_GROUP if group is None else group
        world_size, rank = get_group_size(group), get_rank(group)
    if vocab_start is None:
        vocab_start = rank * shard_classes
    if num_classes is None:
        num_classes = world_size * shard_classes
    for name, value in (("vocab_start", vocab_start), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{API}: `{name}` must be an int, got {value!r}")
    if vocab_start < 0 or vocab_start + shard_classes > num_classes:
        raise ValueError(f"{API}: the logits slice [vocab_start, vocab_start + C_r) = "
                         f"[{vocab_start}, {vocab_start + shard_classes}) must lie inside "
                         f"[0, num_classes = {num_classes})")
    return group, world_size, vocab_start, num_classes


@functools.lru_cache(maxsize=None)
def _vocab_parallel_cell(backend_name, ignore_index, label_smoothing, weighted, soft, *layout):
    """One :class:`VocabParallelRows` per rows backend and configuration (created at compile time
    in GRAPH mode).

    A plain dict cache would be parsed into the graph, and MindSpore cannot make a graph
    constant of a dict holding Cells; the lru_cache wrapper is called as Python instead.
    """
    rows = dispatch.row_kernels(backend_name, NOT_OWNED, 0.0, weighted, soft)
    return VocabParallelRows(rows, ignore_index, label_smoothing, soft, *layout)


def vocab_parallel_cross_entropy_rows(logits, target, weight=None, ignore_index=-100,
                                      label_smoothing=0.0, group=None, vocab_start=None,
                                      num_classes=None):
    """Per-row cross-entropy of logits split over the vocabulary across the ranks of ``group``.

    Args:
        logits: [N, C_r] float16/bfloat16/float32, this rank's classes
            [vocab_start, vocab_start + C_r) of the whole vocabulary of C classes.
        target: [N] int32/int64 class indices of the whole vocabulary (the same on every rank),
            or [N, C_r] float class probabilities for this rank's classes.
        weight: optional [C_r] finite class weights (any sign) of this rank's classes; default None (all 1).
        ignore_index: int, default -100, as in :func:`ms_xent.ops.cross_entropy_rows`.
        label_smoothing: float eps in [0, 1), default 0.0 (the smoothing spreads eps over all C
            classes).
        group: communication group of the ranks sharing these rows (the model-parallel group);
            default None: the world group, or a single process when communication is not
            initialised. On CPU MindSpore's collectives accept only the world group.
        vocab_start: int, first class of this rank's slice; default None: rank * C_r.
        num_classes: int C; default None: world_size * C_r.

    Returns:
        (loss_rows, lse, row_weight), float32 [N] each and the same on every rank: the values of
        :func:`ms_xent.ops.cross_entropy_rows` on the whole logits. Differentiable w.r.t.
        ``logits`` through ``loss_rows`` and ``lse``: each rank gets its slice of the
        single-device gradient, provided every rank of the group computes the same loss from
        these outputs (as tensor-parallel training does). z-loss, masks and reductions are
        applied on the rows by the caller.

    Costs: one AllGather of N floats and one AllReduce of 3N (5N with label smoothing) floats
    per forward, no collective in the backward. Without label smoothing nothing of size
    [N, C_r] is allocated besides the gradient (one backward-kernel call, which recomputes the
    softmax from the logits). With label smoothing the forward adds x_r @ w_r (on a float32
    copy of the slice for half dtypes) and the backward one [N, C_r] float32 temporary. A target outside [0, C) that is not
    ``ignore_index`` raises ValueError in PyNative; in a graph the row's loss is NaN.
    Runs on the rows backend (the fused CPU kernels, or the composed backend on other devices or
    under ``MS_XENT_BACKEND=composed``).
    """
    check_option_values(API, "mean", label_smoothing, 0.0)
    if executing_eagerly():
        check_tensors(API, ("logits", "target"), (logits, target))
    soft = check_logits_and_target(API, logits.shape, logits.dtype, target.shape, target.dtype)
    check_ignore_index(API, ignore_index)
    check_ignore_index_for_probabilities(API, ignore_index, soft)
    group, world_size, vocab_start, num_classes = _shard_layout(group, logits.shape[1],
                                                                vocab_start, num_classes)
    if not soft and executing_eagerly():
        check_target_values(API, target, num_classes, ignore_index)
    weight = class_weight(API, weight, logits.shape[1])
    weighted = weight is not None
    if not weighted:
        weight = ops.ones((logits.shape[1],), ms.float32)
    rows = _vocab_parallel_cell(dispatch.rows_backend(), ignore_index, float(label_smoothing),
                                weighted, soft, num_classes, vocab_start, group, world_size)
    if soft:
        target = target.astype(logits.dtype)
    outputs = rows(logits, target, weight)
    return outputs[0], outputs[1], outputs[2]
