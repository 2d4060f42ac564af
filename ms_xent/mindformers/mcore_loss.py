"""ms_xent's cross-entropy with the interface of MindFormers' mcore training loss.

MindFormers' "mcore" training models (Qwen3, Qwen3-MoE, DeepSeek-V3, TeleChat3, ... built on
``mindformers.parallel_core.training_graph.base_models.gpt.GPTModel``) compute their language-model
loss, and the multi-token-prediction (MTP) loss, with
``mindformers.parallel_core.training_graph.loss_func.CrossEntropyLoss(config: TransformerConfig,
loss_tag='lm', **kwargs)`` called as ``loss(logits, label, input_mask)``.
:class:`McoreCrossEntropyLoss` has that constructor and call and returns the same values, backed
by :class:`ms_xent.nn.CrossEntropyLoss` (the fused kernel: only the per-row log-sum-exp is kept
for the backward), and takes ms_xent's extra options as keyword arguments (in a YAML config: the
keys next to ``type``).
"""

import mindspore as ms
from mindspore import nn
from mindspore.context import ParallelMode

from mindformers.core.context.build_context import Context, get_context
from mindformers.parallel_core.transformer_config import (TransformerConfig,
                                                          default_transformer_config)

from ms_xent.nn import CrossEntropyLoss

API = "McoreCrossEntropyLoss"
# ms_xent options a config may set; everything else comes from the TransformerConfig.
OPTIONS = ("weight", "ignore_index", "label_smoothing", "lse_square_scale_for_zloss",
           "check_for_nan_in_loss_and_grad")
# Arguments of ms_xent.nn.CrossEntropyLoss that this Cell derives from the TransformerConfig: a
# different value in the loss config would disagree with what GPTModel expects back.
FROM_TRANSFORMER_CONFIG = {
    "parallel_config": "data_parallel_size, context_parallel_size, tensor_model_parallel_size",
    "calculate_per_token_loss": "calculate_per_token_loss",
    "seq_split_num": "seq_split_num",
    "reduction": "calculate_per_token_loss / seq_split_num (mean or (numerator, denominator))",
}
# MindFormers' context options that make its mcore loss record per-device losses.
MONITOR_OPTIONS = ("monitor_local_loss", "monitor_device_local_loss")


def _degree(config, name):
    value = getattr(config, name, None)
    return 1 if value is None else int(value)


def mcore_parallel_config(config):
    """ms_xent's ``parallel_config`` for the logits GPTModel passes to its loss.

    Rows [b*s] are split over data_parallel_size * context_parallel_size (MindFormers' loss
    shards them (dp * cp, tp)). The vocabulary is split over tensor_model_parallel_size only under
    semi-auto / auto parallel, where the output layer's shard strategy splits it; in any other
    mode every rank holds whole logits, which the loss must not read as vocabulary shards.
    """
    sharded = ms.get_auto_parallel_context("parallel_mode") in (ParallelMode.SEMI_AUTO_PARALLEL,
                                                                ParallelMode.AUTO_PARALLEL)
    return {
        "data_parallel": (_degree(config, "data_parallel_size")
                          * _degree(config, "context_parallel_size")),
        "model_parallel": _degree(config, "tensor_model_parallel_size") if sharded else 1,
    }


def _check_options(options):
    derived = sorted(set(options) & set(FROM_TRANSFORMER_CONFIG))
    if derived:
        sources = "; ".join(f"{name} from {FROM_TRANSFORMER_CONFIG[name]}" for name in derived)
        raise ValueError(f"{API}: {derived} come from the TransformerConfig (the model config), "
                         f"not from the loss options ({sources})")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"{API}: unknown options {unknown}; the loss accepts {list(OPTIONS)}")


def _check_no_loss_monitoring():
    if not Context.is_exists():
        return
    enabled = [name for name in MONITOR_OPTIONS if get_context(name)]
    if enabled:
        raise NotImplementedError(
            f"{API}: MindFormers' context has {enabled} set; ms_xent's mcore loss does not "
            f"record the per-device local loss. Unset them (monitor_config) or use MindFormers' "
            f"own loss for that run.")


class McoreCrossEntropyLoss(nn.Cell):
    r"""Drop-in for MindFormers' mcore ``CrossEntropyLoss`` on ms_xent's fused kernel.

    With the default options it returns what
    ``mindformers.parallel_core.training_graph.loss_func.CrossEntropyLoss`` returns on the same
    inputs: ``sum_n(l_n * mask_n) / (sum_n(mask_n) + 1e-8)``, float32 of shape ``(1,)``, or the
    pair ``(numerator, denominator)`` (shapes ``()`` and ``(1,)``) when the config has
    ``calculate_per_token_loss`` or ``seq_split_num > 1``, and the same gradient w.r.t. the
    logits.

    Args:
        config: the model's ``TransformerConfig`` (default: MindFormers'
            ``default_transformer_config``), read for

            - the parallel layout: rows over ``data_parallel_size * context_parallel_size``, the
              vocabulary over ``tensor_model_parallel_size`` under semi-auto / auto parallel
              (:func:`mcore_parallel_config`);
            - the output: ``calculate_per_token_loss`` and ``seq_split_num``;
            - the default ``ignore_index``: ``ignore_token_id`` (GPTModel masks the rows whose
              label is ``ignore_token_id``; the loss then ignores them as well).
        loss_tag: ``"lm"`` (the language-model loss) or ``"mtp"`` (the multi-token-prediction
            loss); kept as ``self.loss_tag``, as MindFormers does.
        **options: ms_xent's options (:class:`ms_xent.nn.CrossEntropyLoss`): ``weight`` (class
            weights [vocab]), ``ignore_index``, ``label_smoothing``,
            ``lse_square_scale_for_zloss`` (z-loss scale), ``check_for_nan_in_loss_and_grad``.
            Anything else is refused (TypeError naming it), and so are the arguments that come
            from ``config`` (ValueError), so that a typo in a YAML config does not pass
            silently.

    Differences from MindFormers' loss, all outside what GPTModel feeds it: a row whose label
    equals ``ignore_index`` does not count even where ``input_mask`` is 1 (MindFormers counts it
    with loss 0); a label outside [0, vocab) that is not ``ignore_index`` is an error (MindFormers
    reads it as an all-zero one-hot row); MindFormers' per-device loss monitoring
    (``monitor_local_loss`` / ``monitor_device_local_loss`` in its context) is not implemented and
    refused at construction.

    Inputs:
        - **logits** [N, V] (or [..., V]) float32 / float16 / bfloat16; GPTModel passes [b*s, V].
        - **label** N int32 / int64 class indices.
        - **input_mask** N entries; 0 means the row does not count.
    """

    def __init__(self, config: TransformerConfig = default_transformer_config, loss_tag="lm",
                 **options):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"{API}: `config` must be a mindformers TransformerConfig, got "
                            f"{type(config).__name__}")
        _check_options(options)
        _check_no_loss_monitoring()
        options.setdefault("ignore_index", config.ignore_token_id)
        self.loss_tag = loss_tag
        self.cross_entropy = CrossEntropyLoss(
            mcore_parallel_config(config),
            calculate_per_token_loss=bool(config.calculate_per_token_loss),
            seq_split_num=_degree(config, "seq_split_num"),
            **options)

    def construct(self, logits, label, input_mask):
        """The mean loss, or ``(numerator, denominator)`` (see the class docstring)."""
        return self.cross_entropy(logits, label, input_mask)
