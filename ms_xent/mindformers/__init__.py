"""MindFormers integration (optional extra: ``pip install ms_xent[mindformers]``).

Importing this package registers the ms_xent losses with MindFormers' ``MindFormerRegister`` as
LOSS, under aliases that leave MindFormers' own names alone:

===============================  ==================================================
YAML ``type:``                   class
===============================  ==================================================
``MsXentCrossEntropyLoss``       :class:`ms_xent.nn.CrossEntropyLoss`
``MsXentBCEWithLogitsLoss``      :class:`ms_xent.nn.BCEWithLogitsLoss`
``MsXentLinearCrossEntropyLoss`` :class:`ms_xent.nn.LinearCrossEntropyLoss`
``MsXentMcoreCrossEntropyLoss``  :class:`ms_xent.mindformers.mcore_loss.McoreCrossEntropyLoss`
                                 (the loss of MindFormers' mcore models)
===============================  ==================================================

so that ``mindformers.core.build_loss({"type": "MsXentCrossEntropyLoss", ...})`` and a YAML config
loaded with ``MindFormerConfig`` build them, while ``{"type": "CrossEntropyLoss"}`` still builds
MindFormers' class. MindFormers finds a name only after the module registering it was imported:
import ``ms_xent.mindformers`` before building from a config.

It also registers models whose loss comes from ``model_config.loss``: ``MsXentLlamaForCausalLM``
(:mod:`ms_xent.mindformers.models`, legacy) and the mcore training models
``MsXentQwen3ForCausalLM``, ``MsXentQwen3MoeForCausalLM``, ``MsXentDeepseekV3ForCausalLM``,
``MsXentTeleChat3ForCausalLM``, ``MsXentTeleChat3MoeForCausalLM``
(:mod:`ms_xent.mindformers.mcore_models`, ``use_legacy: False``).

MindFormers writes its logs under ``./output/log`` and its module cache under ``./modules`` unless
``LOG_MF_PATH`` / ``OM_MODULES_CACHE`` are set. Unless already set, this package points them into
the ms_xent cache directory (``$MS_XENT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ms_xent``, else
``~/.cache/ms_xent``) before importing MindFormers; that only takes effect if MindFormers was not
imported earlier. The console output of that import (MindFormers' and MindSpore's WARNINGs
about optional packages and deprecated modules, nothing the user did) goes to
``$LOG_MF_PATH/import_console.log``, and MindFormers' console records show the logger name
``mindformers`` (see :mod:`ms_xent.mindformers._quiet_import`).
"""

import os

from ms_xent._backends.cpu.build import cache_root


def _set_mindformers_paths():
    """Default LOG_MF_PATH and OM_MODULES_CACHE outside the working directory."""
    root = os.path.join(cache_root(), "mindformers")
    os.environ.setdefault("LOG_MF_PATH", os.path.join(root, "log"))
    os.environ.setdefault("OM_MODULES_CACHE", os.path.join(root, "modules"))


_set_mindformers_paths()

# pylint: disable=wrong-import-position
from ms_xent.mindformers._quiet_import import console_to_log, name_mindformers_console_logger

_IMPORT_LOG = os.path.join(os.path.expanduser(os.environ["LOG_MF_PATH"]), "import_console.log")
with console_to_log(_IMPORT_LOG):
    import mindformers  # noqa: F401
from mindformers.tools.logger import get_logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ms_xent.nn.bce_with_logits_loss import BCEWithLogitsLoss
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from ms_xent.nn.linear_cross_entropy_loss import LinearCrossEntropyLoss
from ms_xent.mindformers.mcore_loss import McoreCrossEntropyLoss

LOSS_ALIASES = {
    "MsXentCrossEntropyLoss": CrossEntropyLoss,
    "MsXentBCEWithLogitsLoss": BCEWithLogitsLoss,
    "MsXentLinearCrossEntropyLoss": LinearCrossEntropyLoss,
    "MsXentMcoreCrossEntropyLoss": McoreCrossEntropyLoss,
}


def register():
    """Registers every alias in ``LOSS_ALIASES`` as a MindFormers LOSS (idempotent; runs on import).

    Raises:
        RuntimeError: an alias is already registered to a class that is not ms_xent's (nothing is
            replaced then).
    """
    registered = MindFormerRegister.registry.get(MindFormerModuleType.LOSS, {})
    for alias, cls in LOSS_ALIASES.items():
        current = registered.get(alias)
        if current is not None and current is not cls:
            raise RuntimeError(
                f"ms_xent.mindformers.register: the MindFormers LOSS name {alias!r} is already "
                f"taken by {current.__module__}.{current.__qualname__}; not replacing it with "
                f"{cls.__module__}.{cls.__qualname__}")
    for alias, cls in LOSS_ALIASES.items():
        MindFormerRegister.register_cls(cls, MindFormerModuleType.LOSS, alias=alias)


register()
name_mindformers_console_logger(get_logger())

# Imported to register their classes.
from ms_xent.mindformers import mcore_models, models, train_step  # noqa: E402,F401

__all__ = ["LOSS_ALIASES", "register"]
