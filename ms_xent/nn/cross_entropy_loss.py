"""CrossEntropyLoss Cell: a drop-in for ``mindformers.core.CrossEntropyLoss`` on the fused kernel.

The per-row loss comes from :func:`ms_xent.ops.cross_entropy_rows`, which (on every backend) keeps
only per-row float32 values between forward and backward and recomputes the softmax from the logits in the
backward: with [N, C] logits and class-index labels, no [N, C] tensor besides the logits and their
gradient is allocated (measured: fwd+bwd peak +1.03x the logits at N=8192, C=32000 float32, GRAPH
mode). Logits with more leading dims cost one copy more where MindSpore materialises the reshape
to [N, C] before the kernel (PYNATIVE mode, and GRAPH mode when the logits are a graph input);
MindFormers' models already pass [N, C] logits.

MindFormers is not imported here; :mod:`ms_xent.mindformers` registers this Cell with MindFormers.
"""

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.communication import GlobalComm, get_group_size, get_rank
from mindspore.context import ParallelMode
from mindspore.ops import constexpr
from mindspore.parallel._utils import _get_parallel_mode

from ms_xent.nn.cell_arguments import (check_flag, check_positive_int, class_weight_tensor,
                                       parallel_degrees, wants_per_token_output)
from ms_xent._backends._mindspore import (counted_rows, executing_eagerly, known, reshape,
                                          safe_divide, total)
from ms_xent._backends._reductions import counted_lse
from ms_xent.ops import vocab_parallel_cross_entropy_rows
from ms_xent.ops._cross_entropy import cross_entropy_rows_for
from ms_xent.ops.validation import (FLOAT_TYPES, INDEX_TYPES, SUPPORTED_FLOATS,
                                    check_ignore_index, check_ignore_index_for_probabilities,
                                    check_keywords, check_logit_map, check_option_values,
                                    check_tensors, check_zloss_scale, rank_of)

API = "CrossEntropyLoss"
# MindFormers adds this to the "mean" denominator so that an all-masked batch gives 0, not NaN.
DENOMINATOR_GUARD = 1e-8


def _product(dims):
    """Product of the dims; -1 when one of them is only known at run time."""
    total = 1
    for dim in dims:
        if not known(dim):
            return -1
        total *= dim
    return total


@constexpr
def _flat_shapes(logits_shape, logits_dtype, label_shape, label_dtype, mask_shape):
    """Checks the inputs; returns (N, soft) with N = -1 when it is only known at run time."""
    if logits_dtype not in FLOAT_TYPES:
        raise TypeError(f"{API}: `logits` must be {SUPPORTED_FLOATS}, got {logits_dtype}")
    if rank_of(API, "logits", logits_shape) < 2:
        raise ValueError(f"{API}: `logits` must be [..., C] with at least 2 dims, got shape "
                         f"{tuple(logits_shape)}")
    n_rows, n_classes = _product(logits_shape[:-1]), logits_shape[-1]
    rank_of(API, "label", label_shape)
    soft = label_dtype in FLOAT_TYPES
    if not soft and label_dtype not in INDEX_TYPES:
        raise TypeError(f"{API}: `label` must be int32 or int64 class indices or "
                        f"{SUPPORTED_FLOATS} class probabilities, got {label_dtype}")
    if soft:
        if not label_shape or (known(label_shape[-1]) and known(n_classes)
                               and label_shape[-1] != n_classes):
            raise ValueError(f"{API}: probability `label` must end with the class axis of "
                             f"`logits` ({n_classes}), got shape {tuple(label_shape)}")
        label_rows = _product(label_shape[:-1])
    else:
        label_rows = _product(label_shape)
    if known(n_rows) and known(label_rows) and label_rows != n_rows:
        kind = "[N, C] class probabilities" if soft else "[N] class indices"
        raise ValueError(f"{API}: `label` must hold {kind} for the N = {n_rows} rows of `logits` "
                         f"{tuple(logits_shape)}, got shape {tuple(label_shape)}")
    if mask_shape is not None:
        rank_of(API, "input_mask", mask_shape)
        mask_rows = _product(mask_shape)
        if known(n_rows) and known(mask_rows) and mask_rows != n_rows:
            raise ValueError(f"{API}: `input_mask` must have one entry per row of `logits` "
                             f"(N = {n_rows}), got shape {tuple(mask_shape)}")
    return n_rows, soft


@constexpr
def _check_accuracy_labels(soft):
    if soft:
        raise ValueError(f"{API}: `return_token_accuracy` / `record_token_accuracy` need "
                         f"class-index labels, got probability labels")
    return True


@constexpr
def _process_description():
    """Where the loss was computed, for error messages (the rank when communication is up)."""
    if GlobalComm.INITED:
        return f"rank {get_rank()}"
    return "this process (communication not initialised, no rank)"


class CrossEntropyLoss(nn.Cell):
    r"""Cross-entropy over the last axis of the logits, masked and averaged as MindFormers does.

    A drop-in for ``mindformers.core.CrossEntropyLoss`` (MindFormers 1.9.0): on the same inputs the
    default configuration returns the same value, shape ``(1,)`` and dtype float32 (also for
    float16 / bfloat16 logits, as MindFormers casts to float32), and the same gradient w.r.t. the
    logits. The loss is computed by the fused kernel, which keeps only the per-row log-sum-exp for
    the backward.

    Per row n of the flattened logits x [N, C], with counted-row indicator
    :math:`c_n = 1\{y_n \ne \text{ignore\_index}\}` (1 for probability labels) and weight
    :math:`\rho_n = w[y_n] c_n`:

    .. math::
        \text{loss} = \frac{\sum_n \text{mask}_n\, l_n}{\sum_n \text{mask}_n\, \rho_n + 10^{-8}}
        + \frac{\sum_n \text{mask}_n\, c_n\, s\, \mathrm{lse}_n^2}
               {\sum_n \text{mask}_n\, c_n + 10^{-8}}

    where :math:`l_n` is the (weighted, label-smoothed) cross-entropy of
    :func:`ms_xent.ops.cross_entropy_loss` with reduction "none" and s is
    ``lse_square_scale_for_zloss``. Without class weights and ignored labels the first term is
    exactly MindFormers' ``sum(l * mask) / (sum(mask) + 1e-8)``; with weights it is PyTorch's
    weighted mean restricted to the masked-in rows, divided by the exact weight sum (no 1e-8
    guard: weights of any sign may sum to 0, and then the loss is 0 with zero gradient). The z-loss (second term) is unweighted, as in
    the vendor op, Liger-Kernel and PaLM: class weights scale the cross-entropy of the target class,
    not the log-partition penalty. Without class weights both terms share one denominator; the
    ``(numerator, denominator)`` output needs that, so class weights with a z-loss and that output
    raise ValueError at construction. "sum" adds the two numerators; "none" gives
    :math:`\text{mask}_n (l_n + c_n s\,\mathrm{lse}_n^2)`.

    Rows whose label equals ``ignore_index`` count for nothing (no loss, no gradient, not in the
    denominator) even where ``input_mask`` is 1. MindFormers has no ``ignore_index``: it one-hot
    encodes such a label as all zeros, so the row adds 0 to the numerator, 1 to the denominator
    and ``softmax / denominator`` to the gradient. MindFormers' models zero ``input_mask`` at
    those positions, where both agree.

    Args:
        parallel_config: data_parallel (dp) and model_parallel (mp) degrees: an
            ``OpParallelConfig``, ``TransformerOpParallelConfig``, ``MindFormerConfig``, a dict or
            None (the default: dp = mp = 1). Read by duck typing. How logits split over the
            vocabulary (mp > 1) are handled is described under "Parallel paths" below.
        check_for_nan_in_loss_and_grad: bool, default False; when True, a non-finite result raises
            RuntimeError in PYNATIVE and in GRAPH mode (at the step that produced it, also inside
            ``Model.train``), naming the quantity (loss, or numerator of the per-token loss), its
            value, the rank (when communication is initialised), and how many rows had a non-finite
            loss. In GRAPH mode MindSpore then refuses to run that compiled graph again ("An error
            occurred in the previous step"): training stops, as it does with MindFormers, whose
            1.9.0 Cell accepts and ignores this argument and whose trainer raises ValueError from a
            callback after the step. Checking the loss covers the gradient w.r.t. the logits: it is
            the softmax times finite per-row factors, finite whenever the loss is.
        calculate_per_token_loss: bool, default False; return ``(numerator, denominator)`` (shapes
            ``()`` and ``(1,)``, float32, as MindFormers) instead of their ratio, so that gradient
            accumulation and pipeline stages can sum before dividing. Needs reduction "mean".
        seq_split_num: int >= 1, default 1; sequence pipeline split number; > 1 also returns
            ``(numerator, denominator)``, as MindFormers does.
        weight: optional finite class weights of any sign [C] (Tensor, numpy array or list),
            stored as float32; default None (all 1).
        ignore_index: label value whose rows do not count (default -100).
        label_smoothing: float eps in [0, 1), default 0.0; the label mixes with the uniform
            distribution.
        lse_square_scale_for_zloss: z-loss scale s, default 0.0, any finite s >= 0 (the vendor-signature op
            :func:`ms_xent.ops.cross_entropy_loss` keeps the vendor's [0, 1)); the z-loss is
            added to the loss.
        reduction: "mean" (the default, above), "sum" (the numerator, shape ``(1,)``) or "none" (the masked
            per-row values ``mask_n * r_n``, shape [N]).
        group: communication group of the model-parallel ranks (mp > 1 with explicit
            collectives); default None: the world group, which must then have mp ranks.
        logit_scale, logit_softcap: floats, default 1.0 and 0.0 (no cap); the loss sees cap * tanh(scale * logits / cap) (cap =
            ``logit_softcap`` > 0, Gemma-style softcap) or scale * logits (cap 0), applied
            inside the kernel pass, as in :func:`ms_xent.ops.cross_entropy_loss`. Not with
            vocabulary-parallel logits (ValueError).
        return_z_loss: bool, default False; also return the z-loss term alone (reduced like the loss; it stays
            included in the loss, as in Liger-Kernel: the extra output is for logging).
        return_token_accuracy: bool, default False; also return the token accuracy, float32 0-d: the fraction of
            counted rows (mask != 0, label not ``ignore_index``) whose argmax equals the label
            (Liger-Kernel's definition; 0 when no row counts). Class-index labels only.
        return_predicted_tokens: bool, default False; also return the argmax of every row, [N] in the dtype of the
            labels (int64 for probability labels), for every row whatever its mask or label.
        record_token_accuracy: bool, default False; store the token accuracy of each call in the Parameter
            ``last_token_accuracy`` (float32 0-d, not trainable) without changing the outputs:
            for training loops (e.g. MindFormers / ``Model.train``), where the loss Cell must
            return the loss alone; a Callback reads it after the step
            (:class:`ms_xent.nn.TokenAccuracyMonitor`). Works in PYNATIVE and GRAPH mode.
            The argmax comes from the forward pass that finds the row maximum (no extra pass
            over the logits); the accuracy options are not available with
            vocabulary-parallel logits (ValueError).
        **kwargs: any other keyword raises TypeError naming the closest parameter (a misspelled
            option would otherwise train without it).

    Parallel paths (mp > 1), chosen at construction:

    - SEMI_AUTO_PARALLEL / AUTO_PARALLEL (Ascend / GPU; refused on CPU): as MindFormers' loss,
      two ``Add`` of 0 with shard strategies ((dp, mp), ()) for the logits and ((dp,), ()) for
      the labels ((dp, mp) for probability labels) force that layout at the entry; the framework
      redistributes from there. Not run here (MindSpore refuses these modes on CPU).
    - communication initialised, any other parallel mode (explicit tensor parallelism, e.g. msrun
      on CPU): each rank passes its slice logits[:, r C/mp : (r+1) C/mp] (and of probability
      labels), r its rank in ``group``; the rows come from
      :func:`ms_xent.ops.vocab_parallel_cross_entropy_rows` and equal the single-device ones,
      and so does each rank's slice of the gradient. ``weight`` is the whole vocabulary's [C].
      MindFormers' models outside semi-auto parallel produce whole logits: give them mp = 1.
    - no communication: the logits cannot be split; mp is ignored (single-device path).

    Every argument after ``parallel_config`` is keyword-only: MindFormers' positional order
    differs between releases (1.3 documents ``check_for_nan_in_loss_and_grad`` second, 1.9.0 has
    ``calculate_per_token_loss`` second), and its own models pass them by name.

    Inputs:
        - **logits** [..., C] float16 / bfloat16 / float32, flattened to [N, C].
        - **label** [...] int32 / int64 class indices (N entries), or float [..., C] class
          probabilities (N * C entries; "mean" then divides by the masked-in row count).
        - **input_mask** optional, N entries of any real or bool dtype; 0 means the row does not
          count. None counts every row. NaN / Inf in the logits of a masked-out row still make
          the loss NaN, as in MindFormers (the row's loss is multiplied by 0).

    Outputs:
        float32: shape ``(1,)`` for "mean" / "sum", [N] for "none", or ``(numerator,
        denominator)`` with ``calculate_per_token_loss`` or ``seq_split_num > 1``.
        With ``return_z_loss`` / ``return_token_accuracy`` / ``return_predicted_tokens``: a tuple
        of the above (one entry, or numerator and denominator) followed by the requested extras
        in that order (z-loss shaped like the loss, its numerator in the per-token mode; token
        accuracy; predicted tokens), only those requested.
    """

    def __init__(self, parallel_config=None, *, check_for_nan_in_loss_and_grad=False,
                 calculate_per_token_loss=False, seq_split_num=1, weight=None, ignore_index=-100,
                 label_smoothing=0.0, lse_square_scale_for_zloss=0.0, reduction="mean",
                 group=None, logit_scale=1.0, logit_softcap=0.0, return_z_loss=False,
                 return_token_accuracy=False, return_predicted_tokens=False,
                 record_token_accuracy=False, **kwargs):
        super().__init__()
        self.data_parallel, self.model_parallel = parallel_degrees(parallel_config, API)
        self.check_for_nan_in_loss_and_grad = check_flag("check_for_nan_in_loss_and_grad",
                                                          check_for_nan_in_loss_and_grad, API)
        self.calculate_per_token_loss = check_flag("calculate_per_token_loss",
                                                    calculate_per_token_loss, API)
        self.seq_split_num = check_positive_int("seq_split_num", seq_split_num, API)
        check_option_values(API, reduction, label_smoothing, 0.0)
        check_zloss_scale(API, lse_square_scale_for_zloss)
        check_ignore_index(API, ignore_index)
        check_logit_map(API, logit_softcap, logit_scale)
        self.logit_scale = float(logit_scale)
        self.logit_softcap = float(logit_softcap)
        self.per_token_output = wants_per_token_output(
            self.calculate_per_token_loss, self.seq_split_num, reduction, API)
        self.weight = class_weight_tensor(weight, API, mean_only=(
            reduction == "mean" and not self.per_token_output))
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.zloss_scale = float(lse_square_scale_for_zloss)
        self.reduction = reduction
        self.return_z_loss = check_flag("return_z_loss", return_z_loss, API)
        self.return_token_accuracy = check_flag("return_token_accuracy", return_token_accuracy,
                                                API)
        self.return_predicted_tokens = check_flag("return_predicted_tokens",
                                                  return_predicted_tokens, API)
        self.record_token_accuracy = check_flag("record_token_accuracy", record_token_accuracy,
                                                API)
        if self.weight is not None and self.zloss_scale > 0 and self.per_token_output:
            raise ValueError(f"{API}: `weight` with `lse_square_scale_for_zloss` > 0 and the "
                             f"(numerator, denominator) output (`calculate_per_token_loss` or "
                             f"`seq_split_num` > 1): the class-weighted loss and the unweighted "
                             f"z-loss have different denominators")
        self.accuracy_wanted = self.return_token_accuracy or self.record_token_accuracy
        self.argmax_wanted = self.accuracy_wanted or self.return_predicted_tokens
        if self.record_token_accuracy:
            self.last_token_accuracy = ms.Parameter(ms.Tensor(0.0, ms.float32),
                                                    name="last_token_accuracy",
                                                    requires_grad=False)
        check_keywords(API, CrossEntropyLoss.__init__, kwargs)
        self.guard = ms.Tensor(np.array([DENOMINATOR_GUARD], np.float32))
        self._setup_parallel(group)

    # ---- parallel paths (model_parallel > 1; see "Parallel paths" in the class docstring) ----

    def _setup_parallel(self, group):
        """Picks the path for mp > 1: shard strategies, explicit collectives or none."""
        self.force_layout = _get_parallel_mode() in (ParallelMode.SEMI_AUTO_PARALLEL,
                                                     ParallelMode.AUTO_PARALLEL)
        self.vocab_parallel = (self.model_parallel > 1 and GlobalComm.INITED
                               and not self.force_layout)
        if self.force_layout:
            dp, mp = self.data_parallel, self.model_parallel
            self.add_logits = ops.Add().shard(((dp, mp), ())).add_prim_attr("keep_alive", True)
            self.add_label = ops.Add().shard(((dp,), ())).add_prim_attr("keep_alive", True)
            self.add_soft_label = ops.Add().shard(((dp, mp), ())).add_prim_attr("keep_alive",
                                                                               True)
        if self.vocab_parallel and self.argmax_wanted:
            raise ValueError(f"{API}: `return_token_accuracy` / `record_token_accuracy` / "
                             f"`return_predicted_tokens` are not supported with "
                             f"vocabulary-parallel logits (model_parallel = "
                             f"{self.model_parallel})")
        if self.vocab_parallel and (self.logit_scale != 1.0 or self.logit_softcap > 0):
            raise ValueError(f"{API}: `logit_scale` / `logit_softcap` are not supported with "
                             f"vocabulary-parallel logits (model_parallel = "
                             f"{self.model_parallel}); scale or cap the logits before the loss")
        if not self.vocab_parallel:
            if group is not None:
                raise ValueError(f"{API}: `group` ({group!r}) applies only to model_parallel > 1 "
                                 f"with communication initialised outside semi-auto/auto "
                                 f"parallel; here model_parallel = {self.model_parallel}")
            return
        if group is None:
            group = GlobalComm.WORLD_COMM_GROUP
            if get_group_size(group) != self.model_parallel:
                raise ValueError(
                    f"{API}: parallel_config.model_parallel = {self.model_parallel} but the world "
                    f"group has {get_group_size(group)} ranks; pass the model-parallel "
                    f"communication group as `group`")
        elif get_group_size(group) != self.model_parallel:
            raise ValueError(f"{API}: `group` {group!r} has {get_group_size(group)} ranks, "
                             f"parallel_config.model_parallel is {self.model_parallel}")
        self.vocab_group = group
        self.vocab_start = None
        self.num_classes = None
        self.weight_shard = None
        if self.weight is not None:
            n_classes = self.weight.shape[0]
            if n_classes % self.model_parallel:
                raise ValueError(f"{API}: `weight` has {n_classes} classes, which do not split "
                                 f"evenly over model_parallel = {self.model_parallel} ranks")
            shard_classes = n_classes // self.model_parallel
            self.vocab_start = get_rank(group) * shard_classes
            self.num_classes = n_classes
            self.weight_shard = self.weight[self.vocab_start:self.vocab_start + shard_classes]

    def _row_losses(self, logits, label):
        """Per-row (loss_rows, lse, row_weight), float32 [N] each, for logits [N, C] (or this
        rank's vocabulary slice [N, C/mp] on the vocabulary-parallel path), and the argmax [N]
        when an accuracy option asks for it.

        ``row_weight`` is rho_n (w[y_n], 0 for ignored rows, 1 for probability labels).
        """
        if self.force_layout:
            logits = self.add_logits(logits, 0)
            label = self.add_soft_label(label, 0) if len(label.shape) == 2 else self.add_label(
                label, 0)
        if self.vocab_parallel:
            return vocab_parallel_cross_entropy_rows(
                logits, label, self.weight_shard, self.ignore_index, self.label_smoothing,
                self.vocab_group, self.vocab_start, self.num_classes)
        return cross_entropy_rows_for(API, logits, label, self.weight, self.ignore_index,
                                      self.label_smoothing, logit_scale=self.logit_scale,
                                      logit_softcap=self.logit_softcap,
                                      return_argmax=self.argmax_wanted)

    # ---- end of parallel paths ------------------------------------------------------------------

    def _zloss_rows(self, lse, label, soft, mask):
        """(mask_n c_n s lse_n^2, mask_n c_n) [N]: rows that do not count add exactly 0 and get
        exactly 0 gradient through it, even where lse_n is not finite."""
        indicator = ops.ones_like(lse) if soft else counted_rows(label, self.ignore_index).astype(
            ms.float32)
        counted = indicator if mask is None else indicator * mask
        kept_lse = counted_lse(counted != 0, lse)
        return counted * self.zloss_scale * kept_lse * kept_lse, counted

    def _token_accuracy(self, argmax, label, mask):
        """Fraction of counted rows (label not ignored, mask != 0) whose argmax is the label."""
        counted = counted_rows(label, self.ignore_index)
        if mask is not None:
            counted = counted & (mask != 0)
        hits = (counted & (argmax == label)).astype(ms.float32)
        return safe_divide(total(hits), total(counted.astype(ms.float32)))

    def construct(self, logits, label, input_mask=None):
        """The masked loss of the class docstring.

        Args:
            logits: [..., C] float16 / bfloat16 / float32, flattened to [N, C] (on the
                vocabulary-parallel path this rank's slice [..., C/mp]).
            label: [...] int32 / int64 class indices (N entries), or float [..., C] class
                probabilities (N * C entries).
            input_mask: optional, default None (every row counts); N entries of any real or bool
                dtype, 0 where the row does not count.

        Returns:
            float32: shape ``(1,)`` for "mean" / "sum", [N] for "none", or ``(numerator,
            denominator)`` (shapes ``()`` and ``(1,)``) with ``calculate_per_token_loss`` or
            ``seq_split_num > 1``.
        """
        if executing_eagerly():
            check_tensors(API, ("logits", "label", "input_mask"), (logits, label, input_mask))
        n_rows, soft = _flat_shapes(logits.shape, logits.dtype, label.shape, label.dtype,
                                    None if input_mask is None else input_mask.shape)
        check_ignore_index_for_probabilities(API, self.ignore_index, soft)
        n_classes = logits.shape[-1]
        if len(logits.shape) != 2:
            logits = reshape(logits, (n_rows, n_classes))
        if len(label.shape) != (2 if soft else 1):
            label = reshape(label, (n_rows, n_classes) if soft else (n_rows,))

        rows = self._row_losses(logits, label)
        loss_rows, lse, row_weight = rows[0], rows[1], rows[2]
        # As MindFormers: the rows are multiplied by the mask (a masked-out row with non-finite
        # logits still makes the loss NaN); their gradient is exactly 0.
        mask = None if input_mask is None else input_mask.astype(ms.float32).reshape((n_rows,))
        counted = row_weight if mask is None else row_weight * mask
        contributions = loss_rows if mask is None else loss_rows * mask
        zloss_wanted = self.zloss_scale > 0 or self.return_z_loss
        z_rows, z_counted = self._zloss_rows(lse, label, soft, mask) if zloss_wanted else (
            None, None)

        z_loss, denominator, accuracy = None, None, None
        if self.reduction == "none":
            if zloss_wanted:
                z_loss = z_rows
                contributions = contributions + z_rows
            result = contributions
        elif self.reduction == "sum":
            if zloss_wanted:
                z_loss = total(z_rows).reshape((1,))
                contributions = contributions + z_rows
            result = total(contributions).reshape((1,))
        else:
            # total, not Tensor.sum(): MindSpore's CPU ReduceSum of an empty batch is garbage.
            numerator = total(contributions)
            denominator = total(counted).reshape((1,))
            if self.weight is None:
                denominator = denominator + self.guard
            if self.per_token_output:
                # No class weights with a z-loss here (refused at construction): one denominator.
                if zloss_wanted:
                    z_loss = total(z_rows)
                    contributions = contributions + z_rows
                    numerator = numerator + z_loss
                result = numerator
            else:
                result = safe_divide(numerator, denominator)
                if zloss_wanted:
                    z_loss = (total(z_rows) / (total(z_counted) + self.guard)).reshape((1,))
                    result = result + z_loss
                    contributions = contributions + z_rows

        # Inline in construct: in GRAPH mode a raise inside a called method breaks the grad graph
        # of the Custom kernel ("The prim is not a PrimitivePy").
        if self.check_for_nan_in_loss_and_grad and not ops.isfinite(result).all():
            what = "numerator of the per-token loss" if self.per_token_output else "loss"
            rows = (~ops.isfinite(contributions)).astype(ms.int32).sum()
            raise RuntimeError(
                f"{API} (check_for_nan_in_loss_and_grad=True): the {what} is not finite "
                f"({result}) on {_process_description()}; {rows} of {contributions.shape[0]} "
                f"rows have a non-finite masked per-row loss (NaN/Inf in their logits or "
                f"input_mask, or an overflow).")
        if self.accuracy_wanted:
            _check_accuracy_labels(soft)
            accuracy = self._token_accuracy(rows[3], label, mask)
            if self.record_token_accuracy:
                ops.assign(self.last_token_accuracy, accuracy)
        outputs = (result, denominator) if self.per_token_output else (result,)
        if self.return_z_loss:
            outputs = outputs + (z_loss,)
        if self.return_token_accuracy:
            outputs = outputs + (accuracy,)
        if self.return_predicted_tokens:
            outputs = outputs + (rows[3],)
        return outputs if len(outputs) > 1 else result
