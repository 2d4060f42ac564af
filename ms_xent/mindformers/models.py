"""MindFormers models whose training loss comes from the model config.

MindFormers 1.9's ``LlamaForCausalLM`` hard-codes ``mindformers.core.CrossEntropyLoss``.
:class:`MsXentLlamaForCausalLM` is the same network (same parameters, same forward) whose loss is
built from ``model_config.loss`` with MindFormers' ``build_loss``, so a YAML config can choose it::

    model:
      model_config:
        type: LlamaConfig
        loss:
          type: MsXentCrossEntropyLoss
          label_smoothing: 0.1
          lse_square_scale_for_zloss: 1.0e-4
      arch:
        type: MsXentLlamaForCausalLM

Without ``loss`` in the config the model uses ``ms_xent``'s ``CrossEntropyLoss`` with its defaults.
``parallel_config``, ``calculate_per_token_loss`` and ``seq_split_num`` always come from the model
config (as MindFormers does for its own loss), so the loss and the training wrapper agree.
"""

import copy

import mindspore as ms
from mindspore.common import dtype as mstype
from mindspore.context import ParallelMode

from mindformers.core.loss import build_loss
from mindformers.models.llama import LlamaForCausalLM
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.nn.linear_cross_entropy_loss import LinearCrossEntropyLoss

DEFAULT_LOSS_CONFIG = {"type": CrossEntropyLoss}


def loss_parallel_config(model_config):
    """The layout of the logits the Llama loss receives.

    Rows are split over data_parallel * context_parallel. The vocabulary is split over
    model_parallel only where ``lm_head`` splits it: only under semi-auto / auto parallel (shard
    strategies exist nowhere else: under DATA_PARALLEL every rank holds whole logits, which the
    loss must not read as vocabulary shards), not with ``vocab_emb_dp`` and not when the
    vocabulary does not divide by model_parallel (MindFormers' own loss keeps model_parallel in
    those cases; the logits are whole there either way).
    """
    parallel_config = copy.deepcopy(model_config.parallel_config)
    sharded = ms.get_auto_parallel_context("parallel_mode") in (
        ParallelMode.SEMI_AUTO_PARALLEL, ParallelMode.AUTO_PARALLEL)
    if (not sharded or parallel_config.vocab_emb_dp
            or model_config.vocab_size % parallel_config.model_parallel):
        parallel_config.model_parallel = 1
    parallel_config.data_parallel *= parallel_config.context_parallel
    return parallel_config


def build_model_loss(model_config):
    """The loss Cell that ``model_config.loss`` names (``ms_xent``'s CrossEntropyLoss if absent).

    ``model_config.loss`` is a dict or ``MindFormerConfig`` with ``type`` (a registered LOSS name
    such as ``MsXentCrossEntropyLoss``, or a class) and the loss's keyword arguments.
    """
    loss_config = getattr(model_config, "loss", None)
    if loss_config is None:
        loss_config = DEFAULT_LOSS_CONFIG
    if not isinstance(loss_config, dict) or "type" not in loss_config:
        raise ValueError("model_config.loss must be a mapping with a 'type' key (e.g. "
                         f"{{'type': 'MsXentCrossEntropyLoss'}}), but got {loss_config!r}")
    model_defaults = {
        "parallel_config": loss_parallel_config(model_config),
        # MindFormers' trainer may set it to None, which its own loss reads as False.
        "calculate_per_token_loss": bool(getattr(model_config, "calculate_per_token_loss", False)),
        "seq_split_num": model_config.parallel_config.seq_split_num,
    }
    return build_loss(dict(loss_config), default_args=model_defaults)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class MsXentLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose training loss is built from ``config.loss``.

    Inference and evaluation are MindFormers' own. In training, the forward is split in two steps:
    the decoder's final hidden states, then :meth:`next_token_loss` on them. The second step is the
    extension point for losses that consume the hidden states and the ``lm_head`` weight directly
    (a fused linear + cross-entropy never materialises the [N, vocab] logits): such a loss is
    selected in :meth:`next_token_loss`, nothing else in the forward changes.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.loss = build_model_loss(config)
        # A fused linear + cross-entropy loss takes the hidden states and lm_head's weight.
        self.fused_linear_loss = isinstance(self.loss, LinearCrossEntropyLoss)

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None,
                  attention_mask=None, input_embeds=None, init_reset=None, batch_valid_length=None,
                  batch_index=None, zactivate_len=None, block_tables=None, slot_mapping=None,
                  prefix_keys_values=None, llm_boost_inputs=None, q_seq_lens=None, loss_mask=None,
                  gather_index=None, seq_range=None, actual_seq_len=None):
        """Training: the next-token loss (hidden states, then :meth:`next_token_loss`).

        Inference, evaluation and ``use_past`` run MindFormers' forward unchanged (which calls
        ``self.loss`` too when it computes a loss).
        """
        if not self.training or self.use_past:
            return super().construct(input_ids, labels, input_position, position_ids,
                                     attention_mask, input_embeds, init_reset, batch_valid_length,
                                     batch_index, zactivate_len, block_tables, slot_mapping,
                                     prefix_keys_values, llm_boost_inputs, q_seq_lens, loss_mask,
                                     gather_index, seq_range, actual_seq_len)
        inputs_are_sliced = self.input_sliced_sig and labels is not None
        bsz, seqlen = self.shape(input_ids)
        tokens = input_ids
        if not inputs_are_sliced:
            tokens = self.slice(input_ids, (0, 0), (bsz, seqlen - 1), (1, 1))
            if loss_mask is not None:
                loss_mask = self.slice(loss_mask, (0, 0), (bsz, seqlen - 1), (1, 1))
        if batch_valid_length is not None:
            batch_valid_length = self.reshape(batch_valid_length, (-1,))
        hidden_states = self.model(tokens, input_embeds, batch_valid_length, batch_index,
                                   zactivate_len, block_tables, slot_mapping, prefix_keys_values,
                                   attention_mask, position_ids, q_seq_lens, seq_range,
                                   actual_seq_len)
        hidden_states = self.pre_gather_func(batch_valid_length is not None, hidden_states,
                                             batch_valid_length, gather_index)
        labels, input_mask = self._next_token_targets(input_ids, tokens, labels, loss_mask,
                                                      inputs_are_sliced)
        return self.next_token_loss(hidden_states, labels, input_mask)

    def _next_token_targets(self, input_ids, tokens, labels, loss_mask, inputs_are_sliced):
        """(labels, input_mask) flattened to [N], as MindFormers' LlamaForCausalLM derives them."""
        if loss_mask is not None:
            input_mask = loss_mask
        else:
            input_mask = self.cast(self.not_equal(tokens, self.pad_token_id), mstype.float32)
        bsz, seqlen = self.shape(input_ids)
        if labels is None:
            labels = self.slice(input_ids, (0, 1), (bsz, seqlen), (1, 1))
        elif labels.ndim > 1:
            if not inputs_are_sliced:
                labels = self.slice(labels, (0, 1), (bsz, seqlen), (1, 1))
            if loss_mask is None:
                label_mask = self.cast(self.not_equal(labels, self.ignore_token_id), mstype.float32)
                input_mask = self.mul(input_mask, label_mask)
        return self.reshape(labels, (-1,)), self.reshape(input_mask, (-1,))

    def next_token_loss(self, hidden_states, labels, input_mask):
        """The training loss from the decoder's final hidden states [B, S, H] (or [N, H]).

        Projects to the vocabulary with ``lm_head`` and applies ``self.loss(logits [N, V] float32,
        labels [N], input_mask [N])``; with a ``LinearCrossEntropyLoss`` (YAML ``loss: {type:
        MsXentLinearCrossEntropyLoss}``) the logits are never formed: the loss gets
        ``(hidden_states [N, H], lm_head weight [V, H], labels, input_mask)``.
        """
        if self.fused_linear_loss:
            weight = self.lm_head.weight
            hidden = self.reshape(hidden_states, (-1, hidden_states.shape[-1]))
            return self.loss(self.cast(hidden, weight.dtype), weight, labels, input_mask)
        logits = self.lm_head(hidden_states)
        logits = self.cast(self.reshape(logits, (-1, logits.shape[-1])), mstype.float32)
        return self.loss(logits, labels, input_mask)
