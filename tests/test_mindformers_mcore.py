"""ms_xent in MindFormers' mcore models (Qwen3, DeepSeek-V3, ...): the loss Cell with the mcore
signature, its registration and YAML resolution, the registered models (built from tiny configs
in a subprocess: MindFormers keeps process-wide state), the Ascend YAML configs, parity with
MindFormers' mcore CrossEntropyLoss on GPTModel-shaped inputs (GRAPH mode: MindFormers' loss does
not run in PYNATIVE mode on CPU, OneHotExt has no CPU kernel there), and a 2-worker msrun
DATA_PARALLEL run against a single process.

The full mcore models do not compile on CPU (FlashAttentionScore, RmsNorm, DropoutExt have no
CPU kernels): the models are built, not run; the loss they hold is run.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from mindformers import MindFormerConfig
from mindformers.core import CrossEntropyLoss as MindFormersLegacyCrossEntropyLoss
from mindformers.core import build_loss
from mindformers.parallel_core.training_graph.loss_func import (
    CrossEntropyLoss as MindFormersMcoreCrossEntropyLoss)
from mindformers.parallel_core.transformer_config import TransformerConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

import ms_xent.mindformers  # noqa: F401  (registers the names)
from ms_xent.mindformers import mcore_models
from ms_xent.mindformers.mcore_loss import McoreCrossEntropyLoss, mcore_parallel_config
from ms_xent.mindformers.mcore_models import build_mcore_loss, take_loss_config
from tests.distributed import mcore_data_parallel_worker as dp_worker
from tests.distributed.msrun import run_msrun
from tests.reference import assert_close, torch_masked_cross_entropy

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
BUILD_SCRIPT = TESTS / "mindformers_mcore_build.py"
ASCEND_CONFIGS = ("qwen3_ms_xent_ascend.yaml", "deepseek3_ms_xent_ascend.yaml")
MCORE_PREFIX = "mcore_"
# ms_xent vs MindFormers' mcore loss, float32 (same math, different summation order).
PARITY_RTOL, PARITY_ATOL = 1e-6, 1e-7
# Gradient entries are (softmax - one_hot) / count (mean) or without the division (per-token):
# MindFormers forms softmax as exp(log_softmax), a few ulps off; relative 1e-5 of an entry.
GRADIENT_RTOL, GRADIENT_ATOL = 1e-5, 5e-7


def transformer_config(**fields):
    return TransformerConfig(**dict({"num_attention_heads": 4, "num_layers": 1}, **fields))


# ---- registration and construction ------------------------------------------------------------

def test_loss_builds_from_its_registered_name():
    config = transformer_config(calculate_per_token_loss=True)
    loss = build_loss({"type": "MsXentMcoreCrossEntropyLoss", "label_smoothing": 0.1,
                       "lse_square_scale_for_zloss": 1e-4},
                      default_args={"config": config, "loss_tag": "mtp"})
    assert type(loss) is McoreCrossEntropyLoss
    assert loss.loss_tag == "mtp"
    inner = loss.cross_entropy
    assert (inner.label_smoothing, inner.zloss_scale, inner.per_token_output) == (0.1, 1e-4, True)


def test_models_are_registered_with_the_mcore_prefix_and_mindformers_own_are_untouched():
    registry = MindFormerRegister.registry[MindFormerModuleType.MODELS]
    for model in mcore_models.MODELS:
        assert registry[MCORE_PREFIX + model.__name__] is model
        assert model.__name__ == "MsXent" + model.mindformers_name
        mindformers_own = registry[MCORE_PREFIX + model.mindformers_name]
        assert not mindformers_own.__module__.startswith("ms_xent")
    assert type(build_loss({"type": "CrossEntropyLoss"})) is MindFormersLegacyCrossEntropyLoss


def test_parallel_degrees_come_from_the_transformer_config():
    config = transformer_config(data_parallel_size=2, context_parallel_size=2,
                                tensor_model_parallel_size=4, seq_split_num=2)
    loss = McoreCrossEntropyLoss(config)
    # Stand-alone: whole logits on every rank, rows over dp * cp.
    assert (loss.cross_entropy.data_parallel, loss.cross_entropy.model_parallel) == (4, 1)
    assert loss.cross_entropy.per_token_output  # seq_split_num > 1, as MindFormers
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL)
    try:
        assert mcore_parallel_config(config) == {"data_parallel": 4, "model_parallel": 4}
    finally:
        ms.reset_auto_parallel_context()
    assert mcore_parallel_config(config) == {"data_parallel": 4, "model_parallel": 1}


def test_ignore_index_defaults_to_the_configs_ignore_token_id():
    assert McoreCrossEntropyLoss(transformer_config()).cross_entropy.ignore_index == -100
    loss = McoreCrossEntropyLoss(transformer_config(ignore_token_id=-1))
    assert loss.cross_entropy.ignore_index == -1
    loss = McoreCrossEntropyLoss(transformer_config(ignore_token_id=-1), ignore_index=7)
    assert loss.cross_entropy.ignore_index == 7


@pytest.mark.parametrize("options, error, message", [
    ({"label_smothing": 0.1}, TypeError, r"unknown options \['label_smothing'\]"),
    ({"calculate_per_token_loss": True}, ValueError, "come from the TransformerConfig"),
    ({"reduction": "sum"}, ValueError, "come from the TransformerConfig"),
    ({"parallel_config": {"data_parallel": 2}}, ValueError, "come from the TransformerConfig"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
])
def test_bad_options_are_refused_by_name(options, error, message):
    with pytest.raises(error, match=message):
        McoreCrossEntropyLoss(transformer_config(), **options)


def test_config_must_be_a_transformer_config():
    with pytest.raises(TypeError, match="`config` must be a mindformers TransformerConfig"):
        McoreCrossEntropyLoss({"data_parallel_size": 2})


def test_model_loss_config_is_taken_out_and_checked():
    class ModelConfig:
        pass

    config = ModelConfig()
    assert take_loss_config(config) == {"type": McoreCrossEntropyLoss}
    config.loss = MindFormerConfig(type="MsXentMcoreCrossEntropyLoss", label_smoothing=0.2)
    assert take_loss_config(config) == {"type": "MsXentMcoreCrossEntropyLoss",
                                        "label_smoothing": 0.2}
    assert not hasattr(config, "loss")
    config.loss = {"label_smoothing": 0.2}
    with pytest.raises(ValueError, match="model_config.loss must be a mapping with a 'type' key"):
        take_loss_config(config)


def test_a_loss_without_the_mcore_signature_is_refused():
    with pytest.raises(TypeError, match="does not take MindFormers' mcore loss arguments"):
        build_mcore_loss({"type": "CrossEntropyLoss"}, transformer_config(), "lm")
    loss = build_mcore_loss({"type": MindFormersMcoreCrossEntropyLoss}, transformer_config(), "lm")
    assert type(loss) is MindFormersMcoreCrossEntropyLoss


# ---- the models, built from tiny configs --------------------------------------------------------

@pytest.fixture(scope="module")
def built_models(tmp_path_factory):
    """Runs tests/mindformers_mcore_build.py once; returns its JSON report."""
    out_dir = tmp_path_factory.mktemp("mcore_build")
    completed = subprocess.run([sys.executable, str(BUILD_SCRIPT)], cwd=out_dir,
                               capture_output=True, text=True, timeout=900, check=False)
    if completed.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT.name} exited with {completed.returncode}\n"
                    f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_qwen3_model_uses_the_loss_of_its_config(built_models):
    report = built_models["qwen3"]
    assert report["model"] == "MsXentQwen3ForCausalLM"
    assert report["lm_loss"] == "McoreCrossEntropyLoss"
    assert report["lm_loss_tag"] == "lm"
    assert report["label_smoothing"] == 0.1
    assert report["zloss_scale"] == 1e-4
    assert report["mtp_loss"] is None
    assert report["loss_config"] == {"type": "MsXentMcoreCrossEntropyLoss",
                                     "label_smoothing": 0.1,
                                     "lse_square_scale_for_zloss": 1e-4}


def test_model_without_loss_config_uses_ms_xent_defaults(built_models):
    report = built_models["qwen3_default_loss"]
    assert (report["lm_loss"], report["label_smoothing"], report["zloss_scale"]) == (
        "McoreCrossEntropyLoss", 0.0, 0.0)


def test_mindformers_own_qwen3_keeps_its_loss(built_models):
    report = built_models["mindformers_qwen3"]
    assert report["model"] == "TrainingQwen3ForCausalLM"
    assert report["lm_loss"] == "CrossEntropyLoss"
    assert report["lm_loss_module"] == MindFormersMcoreCrossEntropyLoss.__module__


def test_deepseek_v3_replaces_the_language_model_and_mtp_losses(built_models):
    report = built_models["deepseek_v3"]
    assert report["model"] == "MsXentDeepseekV3ForCausalLM"
    assert (report["lm_loss"], report["lm_loss_tag"]) == ("McoreCrossEntropyLoss", "lm")
    assert (report["mtp_loss"], report["mtp_loss_tag"]) == ("McoreCrossEntropyLoss", "mtp")
    assert report["label_smoothing"] == 0.1


def test_qwen3_moe_model_uses_the_loss_of_its_config(built_models):
    report = built_models["qwen3_moe"]
    assert (report["model"], report["lm_loss"]) == ("MsXentQwen3MoeForCausalLM",
                                                   "McoreCrossEntropyLoss")


def test_the_loss_the_model_holds_matches_mindformers_loss(built_models):
    """The Qwen3 model's own loss object vs MindFormers' loss built from the model's
    TransformerConfig, on GPTModel-shaped inputs, GRAPH mode (value and gradient)."""
    parity = built_models["qwen3_default_loss"]["parity"]
    assert parity["loss_difference"] <= PARITY_ATOL + PARITY_RTOL * abs(parity["mindformers_loss"])
    assert parity["max_gradient_difference"] <= GRADIENT_ATOL


def test_run_mode_predict_and_pynative_are_refused_by_name(built_models):
    assert "RUN_MODE is 'predict'" in built_models["errors"]["predict"]
    assert "MindFormers' Qwen3ForCausalLM" in built_models["errors"]["predict"]
    assert "PYNATIVE mode" in built_models["errors"]["pynative"]


# ---- the Ascend YAML configs ------------------------------------------------------------------

def ms_xent_names(node, key=None):
    """(key, name) for every string value starting with "MsXent" in a parsed YAML tree."""
    if isinstance(node, dict):
        return [found for k, value in node.items() for found in ms_xent_names(value, k)]
    if isinstance(node, (list, tuple)):
        return [found for value in node for found in ms_xent_names(value, key)]
    return [(key, node)] if isinstance(node, str) and node.startswith("MsXent") else []


@pytest.mark.parametrize("name", ASCEND_CONFIGS)
def test_ascend_yaml_parses_and_resolves_its_ms_xent_names(name):
    path = REPO_ROOT / "configs" / name
    assert path.read_text(encoding="utf-8").startswith("# Not runnable here")
    config = MindFormerConfig(str(path))
    assert config.use_legacy is False and config.context.device_target == "Ascend"
    model_config = config.model.model_config
    architecture = model_config.architectures[0]
    assert architecture.startswith("MsXent")
    assert model_config.loss.type == "MsXentMcoreCrossEntropyLoss"
    registry = MindFormerRegister.registry
    module_types = {"architectures": MindFormerModuleType.MODELS,
                    "type": MindFormerModuleType.LOSS}
    found = ms_xent_names(config)
    assert {(key, value) for key, value in found} == {("architectures", architecture),
                                                      ("type", "MsXentMcoreCrossEntropyLoss")}
    for key, value in found:
        module_type = module_types[key]
        registered = MCORE_PREFIX + value if module_type == MindFormerModuleType.MODELS else value
        assert registry[module_type][registered].__module__.startswith("ms_xent.mindformers")
    # The options of the YAML build a working loss.
    options = {k: v for k, v in model_config.loss.items() if k != "type"}
    McoreCrossEntropyLoss(transformer_config(), **options)


# ---- parity with MindFormers' mcore loss on GPTModel-shaped inputs ------------------------------

# (batch, seq, vocab, mask kind, seed). GPTModel passes logits [b*s, V] float32 (cast from the
# output layer), labels [b*s] int32 and the loss mask [b*s] float32; masked-out positions carry
# labels 0 (pad) or ignore_token_id -100.
PARITY_CASES = {
    "b2_s8_v64_random_mask": (2, 8, 64, "random", 0),
    "b3_s5_v151_all_counted": (3, 5, 151, "ones", 1),
    "b1_s16_v1000_ignored_labels": (1, 16, 1000, "ignored", 2),
    "b4_s32_v4096_random_mask": (4, 32, 4096, "random", 3),
    "b2_s4_v32_all_masked": (2, 4, 32, "zeros", 4),
}


def gpt_model_inputs(batch, seq, vocab, mask_kind, seed):
    rng = np.random.default_rng(seed)
    n_rows = batch * seq
    logits = (rng.standard_normal((n_rows, vocab)) * 3).astype(np.float32)
    labels = rng.integers(0, vocab, n_rows).astype(np.int32)
    mask = {"random": rng.random(n_rows) > 0.3, "ones": np.ones(n_rows, bool),
            "zeros": np.zeros(n_rows, bool), "ignored": rng.random(n_rows) > 0.4}[mask_kind]
    if mask_kind == "ignored":
        labels[~mask] = -100  # GPTModel: loss_mask * (labels != ignore_token_id)
    return logits, labels, mask.astype(np.float32)


class LossOutput(nn.Cell):
    """The loss as a scalar objective: the mean, or the numerator of (numerator, denominator)
    (the denominator does not depend on the logits)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def construct(self, logits, labels, mask):
        result = self.loss(logits, labels, mask)
        if isinstance(result, tuple):
            return result[0]
        return result


def loss_and_grad(loss, logits, labels, mask):
    """(outputs as numpy, d objective / d logits) in GRAPH mode."""
    ms.set_context(mode=ms.GRAPH_MODE)
    inputs = (ms.Tensor(logits), ms.Tensor(labels), ms.Tensor(mask))
    outputs = loss(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grad = ms.grad(LossOutput(loss), grad_position=0)(*inputs)
    return [out.asnumpy() for out in outputs], grad.asnumpy()


@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per_token"])
@pytest.mark.parametrize("case", PARITY_CASES)
def test_parity_with_mindformers_mcore_loss_graph_mode(case, per_token):
    config = transformer_config(calculate_per_token_loss=per_token)
    inputs = gpt_model_inputs(*PARITY_CASES[case])
    ours, our_grad = loss_and_grad(McoreCrossEntropyLoss(config), *inputs)
    theirs, their_grad = loss_and_grad(MindFormersMcoreCrossEntropyLoss(config), *inputs)
    assert [out.shape for out in ours] == [out.shape for out in theirs]
    assert [out.dtype for out in ours] == [out.dtype for out in theirs]
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    np.testing.assert_allclose(our_grad, their_grad, rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL)
    # Both against the float64 oracle.
    logits, labels, mask = inputs
    expected, expected_grad = torch_masked_cross_entropy(logits, labels, mask)
    if per_token:
        expected = expected * (mask.sum() + 1e-8)
        expected_grad = expected_grad * (mask.sum() + 1e-8)
    assert_close(ours[0], np.reshape(expected, ours[0].shape), ms.float32, "loss")
    assert_close(our_grad, expected_grad, ms.float32, "gradient")


@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per_token"])
def test_parity_with_bfloat16_logits_as_the_mtp_block_passes_them(per_token):
    """The MTP block hands its logits to the loss in the compute dtype (no cast to float32)."""
    config = transformer_config(calculate_per_token_loss=per_token)
    logits, labels, mask = gpt_model_inputs(2, 8, 64, "random", 6)
    inputs = (ms.Tensor(logits).astype(ms.bfloat16), ms.Tensor(labels), ms.Tensor(mask))
    ms.set_context(mode=ms.GRAPH_MODE)
    results = []
    for loss in (McoreCrossEntropyLoss(config), MindFormersMcoreCrossEntropyLoss(config)):
        outputs = loss(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grad = ms.grad(LossOutput(loss), grad_position=0)(*inputs)
        assert grad.dtype == ms.bfloat16
        results.append(([out.asnumpy() for out in outputs], grad.astype(ms.float32).asnumpy()))
    (ours, our_grad), (theirs, their_grad) = results
    for mine, reference in zip(ours, theirs):
        assert mine.dtype == reference.dtype == np.float32
        np.testing.assert_allclose(mine, reference, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    assert_close(our_grad, their_grad, ms.bfloat16, "gradient")


def test_yaml_options_reach_the_loss_graph_mode():
    """label smoothing, z-loss and class weights from a YAML loss config, against PyTorch
    float64 (GPTModel-shaped inputs)."""
    yaml_config = MindFormerConfig(**{"loss": {
        "type": "MsXentMcoreCrossEntropyLoss", "label_smoothing": 0.1,
        "lse_square_scale_for_zloss": 1e-3, "weight": list(np.linspace(0.5, 1.5, 64))}})
    loss = build_mcore_loss(yaml_config.loss, transformer_config(), "lm")
    logits, labels, mask = gpt_model_inputs(2, 8, 64, "ignored", 5)
    (value,), grad = loss_and_grad(loss, logits, labels, mask)
    expected, expected_grad = torch_masked_cross_entropy(
        logits, labels, mask, weight=np.linspace(0.5, 1.5, 64), label_smoothing=0.1,
        zloss_scale=1e-3)
    assert_close(value, np.reshape(expected, (1,)), ms.float32, "loss")
    assert_close(grad, expected_grad, ms.float32, "gradient")


# ---- msrun DATA_PARALLEL, 2 workers -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("backend")  # the workers get the backend through MS_XENT_BACKEND
def test_data_parallel_two_workers_match_a_single_process(tmp_path):
    run_msrun(Path(dp_worker.__file__), tmp_path)
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(dp_worker.WORLD_SIZE)]
    single = dp_worker.single_process_reference()
    # The reduced weight gradient is the same on both ranks and equals the single process's.
    for rank in ranks:
        np.testing.assert_allclose(rank["weight_grad"], single["weight_grad"], rtol=1e-5,
                                   atol=1e-7)
    # Equal mask counts per rank: the mean of the ranks' losses is the global mean.
    mean_loss = np.mean([rank["loss"] for rank in ranks])
    np.testing.assert_allclose(mean_loss, single["loss"], rtol=1e-6)
    # Per-token outputs summed over the ranks give the global (numerator, denominator).
    numerator = sum(rank["numerator"] for rank in ranks)
    denominator = sum(rank["denominator"] for rank in ranks)
    np.testing.assert_allclose(numerator, single["numerator"], rtol=1e-6)
    np.testing.assert_allclose(denominator, single["denominator"], rtol=1e-6)
    # And MindFormers' own mcore loss in the same single-process setting.
    np.testing.assert_allclose(single["loss"], single["mindformers_loss"], rtol=1e-6)
    np.testing.assert_allclose(single["weight_grad"], single["mindformers_weight_grad"],
                               rtol=1e-5, atol=1e-7)


def test_class_weights_of_any_sign_are_accepted_and_non_finite_refused():
    McoreCrossEntropyLoss(transformer_config(), weight=[1.0, -2.0, 0.5])
    with pytest.raises(ValueError, match="`weight` must be finite, got inf at class 1"):
        McoreCrossEntropyLoss(transformer_config(), weight=[1.0, np.inf, 0.5])
