"""MindFormers' mcore training models with their loss chosen in the model config.

MindFormers 1.9's mcore training models (``TrainingQwen3ForCausalLM``, ...) build ``GPTModel``,
which hard-codes MindFormers' mcore ``CrossEntropyLoss`` as ``self.model.loss`` and, in the
multi-token-prediction block, as ``self.model.mtp.compute_language_model_loss``. The classes here
are those training models, same parameters and forward, whose losses are built from
``model_config.loss`` (default :class:`~ms_xent.mindformers.mcore_loss.McoreCrossEntropyLoss`)::

    use_legacy: False
    model:
      model_config:
        model_type: qwen3
        architectures: ["MsXentQwen3ForCausalLM"]
        loss:
          type: MsXentMcoreCrossEntropyLoss
          label_smoothing: 0.1
          lse_square_scale_for_zloss: 1.0e-4

MindFormers registers these with ``legacy=False``, i.e. as ``mcore_MsXent...``; with
``use_legacy: False`` the name in ``architectures`` is looked up with that prefix, so the YAML names
them without it. MindFormers' own classes (``mcore_Qwen3ForCausalLM``, ...) are not touched.

The loss is built with ``config=<the GPTModel's TransformerConfig>`` and ``loss_tag`` ("lm" or
"mtp"), plus the keys of ``model_config.loss`` other than ``type``; ``type`` must name a loss with
MindFormers' mcore signature (``config`` as first argument). ``loss`` is taken out of the model
config before MindFormers converts it to a TransformerConfig (the conversion refuses unknown
keys); the model keeps it as ``loss_config``.

Not covered: MindFormers' PyNative training models (``mindformers.pynative``, which Qwen3ForCausalLM
and DeepseekV3ForCausalLM pick in PYNATIVE mode) and inference (``RUN_MODE=predict``): both are
refused with an error saying what to use.
"""

import inspect
import os

import mindspore as ms
from mindformers.core.context.build_context import get_context
from mindformers.models.deepseek3.modeling_deepseek_v3_train import TrainingDeepseekV3ForCausalLM
from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
from mindformers.models.qwen3_moe.modeling_qwen3_moe_train import TrainingQwen3MoeForCausalLM
from mindformers.models.telechat3.modeling_telechat3_train import TrainingTeleChat3ForCausalLM
from mindformers.models.telechat3_moe.modeling_telechat3_moe_train import (
    TrainingTeleChat3MoeForCausalLM)
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ms_xent.mindformers.mcore_loss import McoreCrossEntropyLoss

DEFAULT_LOSS_CONFIG = {"type": McoreCrossEntropyLoss}


def take_loss_config(config):
    """Removes ``loss`` from the model config and returns it (``DEFAULT_LOSS_CONFIG`` if absent).

    MindFormers converts the whole model config to a TransformerConfig and fails on a key it does
    not know; ``loss`` is not one of its keys.
    """
    loss_config = config.__dict__.pop("loss", None)
    if loss_config is None:
        return dict(DEFAULT_LOSS_CONFIG)
    if not isinstance(loss_config, dict) or "type" not in loss_config:
        raise ValueError("model_config.loss must be a mapping with a 'type' key (e.g. "
                         f"{{'type': 'MsXentMcoreCrossEntropyLoss'}}), but got {loss_config!r}")
    return dict(loss_config)


def build_mcore_loss(loss_config, transformer_config, loss_tag):
    """The loss Cell ``loss_config`` names, built as GPTModel builds its own loss."""
    options = dict(loss_config)
    loss_type = options.pop("type")
    loss_class = (loss_type if inspect.isclass(loss_type)
                  else MindFormerRegister.get_cls(MindFormerModuleType.LOSS, loss_type))
    if "config" not in inspect.signature(loss_class).parameters:
        raise TypeError(
            f"model_config.loss.type {loss_type!r} ({loss_class.__module__}."
            f"{loss_class.__qualname__}) does not take MindFormers' mcore loss arguments "
            f"(config: TransformerConfig, loss_tag, ...); an mcore model needs such a loss, e.g. "
            f"'MsXentMcoreCrossEntropyLoss'")
    return loss_class(config=transformer_config, loss_tag=loss_tag, **options)


class LossFromModelConfig:
    """Mixin for an mcore training model class: its losses come from ``model_config.loss``.

    List it before the MindFormers training class. ``mindformers_name`` is MindFormers' registered
    model name (for the messages); ``has_pynative_model`` says whether MindFormers builds a separate
    PyNative training model for it (then PYNATIVE mode is refused).
    """

    mindformers_name = None
    has_pynative_model = False

    def __init__(self, config):
        self._check_run_mode()
        loss_config = take_loss_config(config)
        super().__init__(config)
        self.loss_config = loss_config
        gpt_model = self.model
        if gpt_model.post_process or gpt_model.mtp_process:
            gpt_model.loss = build_mcore_loss(loss_config, gpt_model.config, "lm")
        if gpt_model.mtp_process:
            gpt_model.mtp.compute_language_model_loss = build_mcore_loss(
                loss_config, gpt_model.config, "mtp")

    def _check_run_mode(self):
        name = type(self).__name__
        if os.environ.get("RUN_MODE") == "predict":
            raise ValueError(
                f"{name} is a training model and RUN_MODE is 'predict': for inference name "
                f"MindFormers' {self.mindformers_name} in model_config.architectures (the loss "
                f"plays no part in inference)")
        if self.has_pynative_model and get_context("mode") == ms.PYNATIVE_MODE:
            raise NotImplementedError(
                f"{name} is the GRAPH-mode training model; in PYNATIVE mode MindFormers trains "
                f"{self.mindformers_name} with its own PyNative model, whose loss ms_xent does "
                f"not replace. Use context.mode 0 (GRAPH_MODE).")


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class MsXentQwen3ForCausalLM(LossFromModelConfig, TrainingQwen3ForCausalLM):
    """MindFormers' Qwen3 training model (GRAPH mode) with the loss of ``model_config.loss``."""

    mindformers_name = "Qwen3ForCausalLM"
    has_pynative_model = True


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class MsXentQwen3MoeForCausalLM(LossFromModelConfig, TrainingQwen3MoeForCausalLM):
    """MindFormers' Qwen3-MoE training model with the loss of ``model_config.loss``."""

    mindformers_name = "Qwen3MoeForCausalLM"


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class MsXentDeepseekV3ForCausalLM(LossFromModelConfig, TrainingDeepseekV3ForCausalLM):
    """MindFormers' DeepSeek-V3 training model (GRAPH mode) with the loss of
    ``model_config.loss`` for the language model and the multi-token-prediction block."""

    mindformers_name = "DeepseekV3ForCausalLM"
    has_pynative_model = True


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class MsXentTeleChat3ForCausalLM(LossFromModelConfig, TrainingTeleChat3ForCausalLM):
    """MindFormers' TeleChat3 training model with the loss of ``model_config.loss`` (language
    model and multi-token prediction)."""

    mindformers_name = "TeleChat3ForCausalLM"


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class MsXentTeleChat3MoeForCausalLM(LossFromModelConfig, TrainingTeleChat3MoeForCausalLM):
    """MindFormers' TeleChat3-MoE training model with the loss of ``model_config.loss``
    (language model and multi-token prediction)."""

    mindformers_name = "TeleChat3MoeForCausalLM"


MODELS = (MsXentQwen3ForCausalLM, MsXentQwen3MoeForCausalLM, MsXentDeepseekV3ForCausalLM,
          MsXentTeleChat3ForCausalLM, MsXentTeleChat3MoeForCausalLM)
