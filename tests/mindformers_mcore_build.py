"""Subprocess of tests/test_mindformers_mcore.py: builds mcore models from tiny configs on CPU.

Run as ``python tests/mindformers_mcore_build.py`` (in a scratch working directory); prints one
JSON line. Runs in its own process because MindFormers keeps process-wide state: its context
(``use_legacy: False`` selects the mcore registry names) is a singleton, and a failed config
conversion stays in a module-level error log that fails every later conversion.

The models are built with MindFormers' ``build_network`` from a model section naming them in
``architectures``, exactly as a YAML config does; they are not run (the mcore layers have no CPU
kernels). The loss the Qwen3 model holds is run on GPTModel-shaped inputs against MindFormers'
mcore loss built from the same TransformerConfig.
"""

import json
import os
import tempfile

os.environ.setdefault("LOG_MF_PATH", tempfile.mkdtemp(prefix="ms_xent_mcore_log_"))
os.environ.setdefault("OM_MODULES_CACHE", tempfile.mkdtemp(prefix="ms_xent_mcore_modules_"))

# pylint: disable=wrong-import-position
import numpy as np
import mindspore as ms

import ms_xent.mindformers  # noqa: E402,F401  (registers the names)
from mindformers import MindFormerConfig, build_context, set_context  # noqa: E402
from mindformers.models import build_network  # noqa: E402
from mindformers.parallel_core.training_graph.loss_func import CrossEntropyLoss  # noqa: E402

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "seq_length": 8, "max_position_embeddings": 8,
        "params_dtype": "float32", "compute_dtype": "float32",
        "layernorm_compute_dtype": "float32", "softmax_compute_dtype": "float32",
        "rotary_dtype": "float32"}
LOSS = {"type": "MsXentMcoreCrossEntropyLoss", "label_smoothing": 0.1,
        "lse_square_scale_for_zloss": 1e-4}
QWEN3 = dict(TINY, model_type="qwen3", num_key_value_heads=2, head_dim=16)
QWEN3_MOE = dict(QWEN3, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=16, moe_grouped_gemm=True)
DEEPSEEK_V3 = dict(TINY, model_type="deepseek_v3", multi_latent_attention=True,
                   num_nextn_predict_layers=1, mtp_loss_factor=0.3, q_lora_rank=16,
                   kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                   first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=16, n_group=1, topk_group=1, moe_grouped_gemm=True)


def build(model_config, architecture, loss=None):
    model_config = dict(model_config, architectures=[architecture])
    if loss is not None:
        model_config["loss"] = loss
    return build_network(MindFormerConfig(model_config=model_config))


def describe(network):
    gpt_model = network.model
    mtp_loss = (gpt_model.mtp.compute_language_model_loss if gpt_model.mtp_process else None)
    lm_loss = gpt_model.loss
    inner = getattr(lm_loss, "cross_entropy", None)
    return {
        "model": type(network).__name__,
        "lm_loss": type(lm_loss).__name__,
        "lm_loss_module": type(lm_loss).__module__,
        "lm_loss_tag": getattr(lm_loss, "loss_tag", None),
        "mtp_loss": None if mtp_loss is None else type(mtp_loss).__name__,
        "mtp_loss_tag": getattr(mtp_loss, "loss_tag", None),
        "label_smoothing": getattr(inner, "label_smoothing", None),
        "zloss_scale": getattr(inner, "zloss_scale", None),
        "loss_config": ({key: getattr(value, "__name__", value)
                         for key, value in network.loss_config.items()}
                        if hasattr(network, "loss_config") else None),
    }


def loss_parity(network):
    """The model's loss vs MindFormers' mcore loss built from the model's TransformerConfig, on
    logits [b*s, V] float32, labels [b*s] int32, loss mask [b*s] float32 (GRAPH mode)."""
    rng = np.random.default_rng(0)
    vocab, rows = network.model.vocab_size, 2 * network.model.seq_length
    inputs = (ms.Tensor((rng.standard_normal((rows, vocab)) * 3).astype(np.float32)),
              ms.Tensor(rng.integers(0, vocab, rows).astype(np.int32)),
              ms.Tensor((rng.random(rows) > 0.3).astype(np.float32)))
    results = {}
    for name, loss in (("ms_xent", network.model.loss),
                       ("mindformers", CrossEntropyLoss(config=network.model.config))):
        value = loss(*inputs)
        grad = ms.grad(loss, grad_position=0)(*inputs)
        results[name] = (value.asnumpy(), grad.asnumpy())
    return {
        "ms_xent_loss": float(results["ms_xent"][0][0]),
        "mindformers_loss": float(results["mindformers"][0][0]),
        "loss_difference": float(abs(results["ms_xent"][0][0] - results["mindformers"][0][0])),
        "max_gradient_difference": float(np.abs(results["ms_xent"][1]
                                                - results["mindformers"][1]).max()),
    }


def error_of(action):
    try:
        action()
    except Exception as error:  # pylint: disable=broad-except
        return f"{type(error).__name__}: {error}"
    return None


def main():
    build_context({"use_legacy": False, "context": {"mode": 0, "device_target": "CPU"},
                   "parallel": {}})
    report = {}
    report["qwen3"] = describe(build(QWEN3, "MsXentQwen3ForCausalLM", LOSS))
    default_loss_model = build(QWEN3, "MsXentQwen3ForCausalLM")
    report["qwen3_default_loss"] = dict(describe(default_loss_model),
                                        parity=loss_parity(default_loss_model))
    report["mindformers_qwen3"] = describe(build(QWEN3, "Qwen3ForCausalLM"))
    report["qwen3_moe"] = describe(build(QWEN3_MOE, "MsXentQwen3MoeForCausalLM", LOSS))
    report["deepseek_v3"] = describe(build(DEEPSEEK_V3, "MsXentDeepseekV3ForCausalLM", LOSS))

    errors = {}
    os.environ["RUN_MODE"] = "predict"
    errors["predict"] = error_of(lambda: build(QWEN3, "MsXentQwen3ForCausalLM"))
    del os.environ["RUN_MODE"]
    set_context(mode=ms.PYNATIVE_MODE)
    errors["pynative"] = error_of(lambda: build(QWEN3, "MsXentQwen3ForCausalLM"))
    report["errors"] = errors
    print(json.dumps(report))


if __name__ == "__main__":
    main()
