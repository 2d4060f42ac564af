"""msrun worker of tests/test_vocab_parallel.py: runs every case on this rank and saves the results.

Launched as ``msrun --worker_num=2 --local_worker_num=2 ... vocab_parallel_worker.py OUT_DIR``.
Every rank builds the same full inputs from the case's seed and takes its part: a slice of the
classes (layout "mp": logits, weights and probability targets split over the vocabulary) or of
the rows (layout "dp"). It computes the objective and its gradient w.r.t. its part of the logits
in PYNATIVE and in GRAPH mode and saves them as OUT_DIR/<case>-<mode>-rank<r>.npz; the test
process puts the parts together and compares them with a single-process run.

The case table and the objective live here so that the test builds its references from exactly
the same definitions.
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops

IGNORE_INDEX = -100
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16}


@dataclass(frozen=True)
class Case:
    """One configuration; ``api`` "rows" is the functional API under the objective below,
    "cell" is ms_xent.nn.CrossEntropyLoss with the parallel_config of the layout (mp or dp = 2),
    "cell_per_token" the same with calculate_per_token_loss=True, its numerator divided by the
    denominator summed over the ranks (the data-parallel way to get the global mean)."""

    layout: str = "mp"
    api: str = "rows"
    n_rows: int = 12
    n_classes: int = 40
    seed: int = 0
    weighted: bool = False
    ignore_fraction: float = 0.0
    label_smoothing: float = 0.0
    zloss: float = 0.0
    masked: bool = False
    soft: bool = False
    dtype: str = "float32"
    index_dtype: str = "int64"
    # Classes per rank when the split is uneven (passed as vocab_start / num_classes).
    shards: Optional[Tuple[int, ...]] = None
    # Rows that need the split log-sum-exp: row 2 confident (p = 1 - 1e-6 on the last class,
    # another rank's than most of the mass of the others), row 3 offset by 1e6.
    extreme: bool = False
    # Row 2 targets the last class and the last rank's whole slice of it is -inf: the loss of the
    # row is +inf, as on a single device (the ranks' combination once made it NaN).
    minus_inf_slice: bool = False


CASES = {
    "plain": Case(seed=1),
    "smoothing_ignored": Case(seed=2, label_smoothing=0.1, ignore_fraction=0.25),
    "weights_zloss_ignored": Case(seed=3, weighted=True, zloss=1e-3, ignore_fraction=0.25,
                                  index_dtype="int32"),
    "all_options": Case(seed=4, weighted=True, label_smoothing=0.2, zloss=1e-3,
                        ignore_fraction=0.25, masked=True),
    "soft_targets": Case(seed=5, soft=True, weighted=True, label_smoothing=0.1, zloss=1e-3,
                         masked=True),
    "confident_and_offset_rows": Case(seed=12, extreme=True, weighted=True, zloss=1e-3),
    "minus_inf_target_slice": Case(seed=13, minus_inf_slice=True),
    "uneven_shards": Case(seed=6, n_classes=37, shards=(20, 17), weighted=True,
                          label_smoothing=0.1, zloss=1e-3, ignore_fraction=0.25),
    "bfloat16": Case(seed=7, dtype="bfloat16", weighted=True, label_smoothing=0.1, zloss=1e-3,
                     ignore_fraction=0.25),
    "cell_mp": Case(api="cell", seed=8, weighted=True, label_smoothing=0.1, zloss=1e-3,
                    ignore_fraction=0.25, masked=True),
    "cell_mp_soft": Case(api="cell", seed=9, soft=True, label_smoothing=0.1, zloss=1e-3,
                         masked=True),
    # Every rank counts the same rows: the mean of the ranks' losses is the global mean.
    "cell_dp": Case(api="cell", layout="dp", seed=10, label_smoothing=0.1, zloss=1e-3),
    # Class weights with a z-loss have no common denominator: this output refuses them.
    "cell_dp_per_token": Case(api="cell_per_token", layout="dp", seed=11, weighted=True,
                              label_smoothing=0.1, ignore_fraction=0.25, masked=True),
}


def make_inputs(case):
    """Full float32/int inputs of a case (numpy): logits, target, weight (or None), mask."""
    rng = np.random.default_rng(case.seed)
    x = (rng.standard_normal((case.n_rows, case.n_classes)) * 3).astype(np.float32)
    if case.soft:
        target = rng.random((case.n_rows, case.n_classes)).astype(np.float32)
        target /= target.sum(axis=1, keepdims=True)
    else:
        target = rng.integers(0, case.n_classes, case.n_rows).astype(case.index_dtype)
        target[rng.random(case.n_rows) < case.ignore_fraction] = IGNORE_INDEX
        target[0] = case.n_classes - 1  # the last class, owned by the last rank
        target[1] = 0
    if case.extreme:
        x[2] = (rng.standard_normal(case.n_classes) * 0.5).astype(np.float32)
        others = np.exp(x[2, :-1].astype(np.float64)).sum()
        x[2, -1] = np.float32(np.log(others * (1 - 1e-6) / 1e-6))
        target[2] = case.n_classes - 1
        x[3] += np.float32(1e6)
    if case.minus_inf_slice:
        target[2] = case.n_classes - 1
        x[2, class_slices(case, 2)[1][0]:] = -np.inf
    weight = (rng.random(case.n_classes) + 0.25).astype(np.float32) if case.weighted else None
    mask = (rng.random(case.n_rows) < 0.7).astype(np.float32) if case.masked else np.ones(
        case.n_rows, np.float32)
    mask[:2] = 1.0
    return x, target, weight, mask


def class_slices(case, world_size):
    """[start, stop) of every rank's classes."""
    sizes = case.shards or (case.n_classes // world_size,) * world_size
    if sum(sizes) != case.n_classes:
        raise ValueError(f"case shards {sizes} do not cover {case.n_classes} classes")
    bounds = np.cumsum((0,) + tuple(sizes))
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(world_size)]


def row_slices(case, world_size):
    """[start, stop) of every rank's rows (data parallelism)."""
    per_rank = case.n_rows // world_size
    return [(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]


def rows_objective(row_losses, logits, target, mask, zloss):
    """The CrossEntropyLoss objective on per-row values, with the unweighted z-loss over the
    counted rows c_n (not ignored; all rows for probabilities):
    sum_n mask_n l_n / (sum_n mask_n rho_n + 1e-8)
    + sum_n mask_n c_n s lse_n^2 / (sum_n mask_n c_n + 1e-8)."""
    loss_rows, lse, row_weight = row_losses(logits, target)
    counted = mask if len(target.shape) == 2 else mask * (target != IGNORE_INDEX).astype(
        ms.float32)
    kept_lse = ops.select(counted != 0, lse, ops.zeros_like(lse))
    loss = ((loss_rows * mask).sum() / ((row_weight * mask).sum() + 1e-8)
            + (zloss * counted * kept_lse * kept_lse).sum() / (counted.sum() + 1e-8))
    return loss, loss_rows, lse, row_weight


class RowsObjective(nn.Cell):
    """rows_objective over a per-row function ``row_losses(logits, target)``."""

    def __init__(self, row_losses, zloss):
        super().__init__()
        self.row_losses = row_losses
        self.zloss = zloss

    def construct(self, logits, target, mask):
        return rows_objective(self.row_losses, logits, target, mask, self.zloss)


class CellObjective(nn.Cell):
    """CrossEntropyLoss(logits, target, mask) (per_token: numerator / ``total_denominator``), with
    placeholders for the per-row outputs, which the Cell does not return."""

    def __init__(self, loss_cell, total_denominator=None):
        super().__init__()
        self.loss_cell = loss_cell
        self.total_denominator = total_denominator

    def construct(self, logits, target, mask):
        loss = self.loss_cell(logits, target, mask)
        if self.total_denominator is not None:
            loss = loss[0] / self.total_denominator
        loss = loss.reshape(())
        return loss, loss, loss, loss


def to_tensors(case, x, target, weight):
    dtype = DTYPES[case.dtype]
    logits = ms.Tensor(x).astype(dtype)
    target = ms.Tensor(target).astype(dtype) if case.soft else ms.Tensor(target)
    return logits, target, None if weight is None else ms.Tensor(weight)


def vocab_parallel_objective(case, rank, world_size, weight):
    from ms_xent.ops.vocab_parallel import vocab_parallel_cross_entropy_rows

    start, _ = class_slices(case, world_size)[rank]
    layout = {"vocab_start": start, "num_classes": case.n_classes} if case.shards else {}

    def row_losses(logits, target):
        return vocab_parallel_cross_entropy_rows(
            logits, target, weight, IGNORE_INDEX, case.label_smoothing, **layout)

    return RowsObjective(row_losses, case.zloss)


def cell_objective(case, weight, world_size, inputs):
    """ms_xent.nn.CrossEntropyLoss configured like the case, over the whole vocabulary's weight;
    for "cell_per_token", divided by the denominator summed over the ranks (an AllReduce)."""
    from mindspore import ops
    from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss

    degrees = {"mp": "model_parallel", "dp": "data_parallel"}
    per_token = case.api == "cell_per_token"
    loss = CrossEntropyLoss({degrees[case.layout]: world_size}, weight=weight,
                            ignore_index=IGNORE_INDEX, label_smoothing=case.label_smoothing,
                            lse_square_scale_for_zloss=case.zloss,
                            calculate_per_token_loss=per_token)
    if not per_token:
        return CellObjective(loss)
    total = ops.AllReduce()(loss(*inputs)[1])
    return CellObjective(loss, total)


def local_part(case, rank, world_size):
    """This rank's (logits, target, weight, mask) as numpy arrays; the weight is the whole
    vocabulary's for the Cell (it takes its slice itself)."""
    x, target, weight, mask = make_inputs(case)
    if case.layout == "dp":
        start, stop = row_slices(case, world_size)[rank]
        return x[start:stop], target[start:stop], weight, mask[start:stop]
    start, stop = class_slices(case, world_size)[rank]
    if case.soft:
        target = target[:, start:stop]
    if weight is not None and case.api == "rows":
        weight = weight[start:stop]
    return x[:, start:stop], target, weight, mask


def run_case(case, rank, world_size):
    """{name: numpy array} of one case on this rank, in the current execution mode."""
    x, target, weight, mask = local_part(case, rank, world_size)
    logits, target, weight = to_tensors(case, x, target, weight)
    inputs = (logits, target, ms.Tensor(mask))
    if case.api == "rows":
        objective = vocab_parallel_objective(case, rank, world_size, weight)
    else:
        objective = cell_objective(case, weight, world_size, inputs)
    return value_and_grad(objective, *inputs)


def value_and_grad(objective, logits, target, mask):
    """{loss, loss_rows, lse, row_weight, grad} of an objective, as float64 numpy arrays."""
    (loss, loss_rows, lse, row_weight), grad = ms.value_and_grad(
        objective, grad_position=0, has_aux=True)(logits, target, mask)
    outputs = {"loss": loss, "loss_rows": loss_rows, "lse": lse, "row_weight": row_weight,
               "grad": grad}
    return {name: value.astype(ms.float32).asnumpy().astype(np.float64)
            for name, value in outputs.items()}


def main(out_dir):
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_device("CPU")
    init()
    rank, world_size = get_rank(), get_group_size()
    for mode_name, mode in MODES.items():
        ms.set_context(mode=mode)
        for name, case in CASES.items():
            results = run_case(case, rank, world_size)
            np.savez(os.path.join(out_dir, f"{name}-{mode_name}-rank{rank}.npz"), **results)
    with open(os.path.join(out_dir, f"done-rank{rank}"), "w", encoding="utf-8") as marker:
        marker.write("ok\n")


if __name__ == "__main__":
    main(sys.argv[1])
