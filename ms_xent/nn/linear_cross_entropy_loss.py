"""LinearCrossEntropyLoss Cell: the MindFormers-style loss of ``hidden @ weight.T`` without logits.

The drop-in counterpart of ``ms_xent.nn.CrossEntropyLoss`` for a model that hands its final hidden
states and its lm_head weight to the loss instead of computing the logits: the same value, shape
and gradient as ``CrossEntropyLoss()(hidden @ weight.T + bias, label, input_mask)``, computed by
:func:`ms_xent.ops.linear_cross_entropy` block by block, so that the [N, V] logits and their
gradient never exist.
"""

import mindspore as ms
from mindspore import nn, ops

from ms_xent._backends._mindspore import executing_eagerly, reshape

from ms_xent.nn.cell_arguments import (check_flag, check_positive_int, class_weight_tensor,
                                       parallel_degrees, wants_per_token_output)
from ms_xent.ops.linear_cross_entropy import linear_cross_entropy_impl
from ms_xent.ops.validation import (check_ignore_index, check_keywords, check_option_values,
                                    check_tensors, check_zloss_scale)

API = "LinearCrossEntropyLoss"
# MindFormers adds this to the "mean" denominator so that an all-masked batch gives 0, not NaN.
DENOMINATOR_GUARD = 1e-8


class LinearCrossEntropyLoss(nn.Cell):
    r"""Masked cross-entropy of ``hidden @ weight.T + bias``, averaged as MindFormers does.

    On the same inputs it returns what ``ms_xent.nn.CrossEntropyLoss`` (and so
    ``mindformers.core.CrossEntropyLoss``) returns for the logits ``hidden @ weight.T + bias``: with
    :math:`l_n` the per-row cross-entropy, :math:`\rho_n = w[y_n] \cdot 1\{y_n \ne
    \text{ignore\_index}\}` and s the z-loss scale,

    .. math::
        \text{loss} = \frac{\sum_n \text{mask}_n (l_n + s\,\rho_n\,\mathrm{lse}_n^2)}
                           {\sum_n \text{mask}_n\, \rho_n + 10^{-8}}

    (with class weights the exact weight sum, without the 1e-8: weights of any sign may sum to 0,
    and then the loss is 0 with zero gradient), float32, shape ``(1,)``. The logits may be transformed first: ``logit_scale`` multiplies them
    and ``logit_softcap`` > 0 applies ``cap * tanh(logits / cap)`` (Gemma), both inside the fused
    loop. Gradients w.r.t. ``hidden``, ``weight`` and ``bias`` are exact to float32 accumulation.

    Args:
        parallel_config: data_parallel / model_parallel degrees (an ``OpParallelConfig``-like
            object, a dict or None, the default: dp = mp = 1). model_parallel > 1 (a vocabulary
            split across devices) raises NotImplementedError: each device would normalise over its
            own slice of the vocabulary.
        check_for_nan_in_loss_and_grad: bool, default False; when True a non-finite loss raises
            RuntimeError (PYNATIVE and GRAPH mode), naming the quantity and its value.
        calculate_per_token_loss: bool, default False; return ``(numerator, denominator)`` (shapes
            ``()`` and ``(1,)``) instead of their ratio, as MindFormers does; needs reduction
            "mean".
        seq_split_num: int >= 1, default 1; > 1 also returns ``(numerator, denominator)``, as
            MindFormers does.
        weight: optional finite class weights of any sign [V] (Tensor, numpy array or list);
            default None (all 1).
        ignore_index: label value whose rows do not count (default -100).
        label_smoothing: float eps in [0, 1), default 0.0.
        lse_square_scale_for_zloss: z-loss scale s, any finite s >= 0, default 0.0; added to
            the loss, unweighted (mean over the counted masked-in rows), as in
            ``CrossEntropyLoss``; class weights with a z-loss and the (numerator, denominator)
            output raise ValueError.
        reduction: "mean" (the default, above), "sum" (the numerator, shape ``(1,)``) or "none" (the
            masked per-row values, [N]).
        logit_softcap: float cap >= 0, default 0.0 (0 disables the softcap).
        logit_scale: float, non-zero, default 1.0; factor applied to the logits before the softcap.
        chunk_size: int, logits alive at once, in rows of V (default None: automatic, see
            :func:`ms_xent.ops.linear_cross_entropy`).
        **kwargs: any other keyword raises TypeError naming the closest parameter.

    Inputs:
        - **hidden** [..., H] float32 / bfloat16 / float16, flattened to [N, H].
        - **weight** [V, H] lm_head weight (MindFormers' layout), dtype of ``hidden``.
        - **label** [...] int32 / int64 class indices, N entries.
        - **input_mask** optional, N entries of any real or bool dtype; 0: the row does not count.
        - **bias** optional [V], dtype of ``hidden``.

    Outputs:
        float32: shape ``(1,)`` for "mean" / "sum", [N] for "none", or ``(numerator,
        denominator)``.
    """

    def __init__(self, parallel_config=None, *, check_for_nan_in_loss_and_grad=False,
                 calculate_per_token_loss=False, seq_split_num=1, weight=None, ignore_index=-100,
                 label_smoothing=0.0, lse_square_scale_for_zloss=0.0, reduction="mean",
                 logit_softcap=0.0, logit_scale=1.0, chunk_size=None, **kwargs):
        super().__init__()
        self.data_parallel, self.model_parallel = parallel_degrees(parallel_config, API)
        if self.model_parallel > 1:
            raise NotImplementedError(
                f"{API}: parallel_config.model_parallel = {self.model_parallel} is not supported: "
                f"the softmax is taken over the rows of the `weight` this Cell receives, so a "
                f"vocabulary split over {self.model_parallel} devices would normalise each "
                f"device's loss over its own slice. Use model_parallel = 1 for the loss.")
        self.check_for_nan_in_loss_and_grad = check_flag("check_for_nan_in_loss_and_grad",
                                                          check_for_nan_in_loss_and_grad, API)
        calculate_per_token_loss = check_flag("calculate_per_token_loss",
                                               calculate_per_token_loss, API)
        seq_split_num = check_positive_int("seq_split_num", seq_split_num, API)
        check_option_values(API, reduction, label_smoothing, 0.0)
        check_zloss_scale(API, lse_square_scale_for_zloss)
        check_ignore_index(API, ignore_index)
        self.per_token_output = wants_per_token_output(calculate_per_token_loss, seq_split_num,
                                                       reduction, API)
        self.class_weight = class_weight_tensor(weight, API, mean_only=(
            reduction == "mean" and not self.per_token_output))
        if self.class_weight is not None and lse_square_scale_for_zloss > 0 \
                and self.per_token_output:
            raise ValueError(f"{API}: `weight` with `lse_square_scale_for_zloss` > 0 and the "
                             f"(numerator, denominator) output (`calculate_per_token_loss` or "
                             f"`seq_split_num` > 1): the class-weighted loss and the unweighted "
                             f"z-loss have different denominators")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.zloss_scale = float(lse_square_scale_for_zloss)
        self.reduction = reduction
        self.logit_softcap = float(logit_softcap)
        self.logit_scale = float(logit_scale)
        self.chunk_size = chunk_size
        check_keywords(API, LinearCrossEntropyLoss.__init__, kwargs)

    def _raise_if_not_finite(self, value, what):
        if not ops.isfinite(value).all():
            raise RuntimeError(f"{API} (check_for_nan_in_loss_and_grad=True): the {what} is not "
                               f"finite ({value}): NaN/Inf in the hidden states, the weight or "
                               f"input_mask, or an overflow.")

    def construct(self, hidden, weight, label, input_mask=None, bias=None):
        """The masked loss of the class docstring for the logits ``hidden @ weight.T + bias``.

        Args:
            hidden: [..., H] float32 / bfloat16 / float16, flattened to [N, H].
            weight: [V, H] lm_head weight (MindFormers' layout), dtype of ``hidden``.
            label: [...] int32 / int64 class indices in [0, V) or ``ignore_index``, N entries.
            input_mask: optional, default None (every row counts); N entries of any real or bool
                dtype, 0 where the row does not count.
            bias: optional [V] in the dtype of ``hidden``, default None (no bias).

        Returns:
            float32: shape ``(1,)`` for "mean" / "sum", [N] for "none", or ``(numerator,
            denominator)`` (shapes ``()`` and ``(1,)``) with ``calculate_per_token_loss`` or
            ``seq_split_num > 1``.
        """
        if executing_eagerly():
            check_tensors(API, ("hidden", "weight", "label", "input_mask", "bias"),
                          (hidden, weight, label, input_mask, bias))
        n_hidden = hidden.shape[-1]
        if len(hidden.shape) != 2:
            hidden = reshape(hidden, (-1, n_hidden))
        n_rows = hidden.shape[0]
        label = label.reshape((n_rows,))
        if input_mask is not None:
            input_mask = input_mask.astype(ms.float32).reshape((n_rows,))
        result = linear_cross_entropy_impl(
            API, hidden, weight, label, bias, self.ignore_index, self.class_weight,
            self.label_smoothing, self.zloss_scale, self.logit_softcap, self.logit_scale,
            self.reduction, input_mask, self.per_token_output, self.chunk_size,
            DENOMINATOR_GUARD if self.class_weight is None else 0.0)
        if self.reduction == "none":
            value, what = result, "per-row loss"
        elif self.per_token_output:
            numerator, denominator = result
            if self.check_for_nan_in_loss_and_grad:
                self._raise_if_not_finite(numerator, "numerator of the per-token loss")
            return numerator, denominator.reshape((1,))
        else:
            value, what = result.reshape((1,)), "loss"
        if self.check_for_nan_in_loss_and_grad:
            self._raise_if_not_finite(value, what)
        return value
