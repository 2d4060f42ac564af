"""ms_xent.mindformers: registration of the ms_xent losses with MindFormers (build_loss, YAML
through MindFormerConfig), MindFormers' own names left alone, nothing written to the working
directory, and a mindspore.train.Model run whose loss matches MindFormers' step by step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops
from mindspore.train import Callback, Model
import mindspore.dataset as ds

import ms_xent.mindformers as ms_xent_mindformers
from mindformers import MindFormerConfig
from mindformers.core import CrossEntropyLoss as MindFormersCrossEntropyLoss
from mindformers.core import build_loss
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ms_xent.nn.bce_with_logits_loss import BCEWithLogitsLoss
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from tests.reference import assert_close, torch_masked_cross_entropy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aliases_build_the_ms_xent_classes():
    built = build_loss({"type": "MsXentCrossEntropyLoss", "label_smoothing": 0.1,
                        "parallel_config": {"data_parallel": 2, "model_parallel": 1}})
    assert type(built) is CrossEntropyLoss
    assert (built.label_smoothing, built.data_parallel) == (0.1, 2)
    assert type(build_loss({"type": "MsXentBCEWithLogitsLoss"})) is BCEWithLogitsLoss


def test_mindformers_own_names_are_untouched():
    assert type(build_loss({"type": "CrossEntropyLoss"})) is MindFormersCrossEntropyLoss
    assert type(build_loss(class_name="BCEWithLogitsLoss")) is nn.BCEWithLogitsLoss
    registry = MindFormerRegister.registry[MindFormerModuleType.LOSS]
    ours = {name for name, cls in registry.items() if cls.__module__.startswith("ms_xent")}
    assert ours == set(ms_xent_mindformers.LOSS_ALIASES)


def test_register_is_idempotent_and_refuses_to_replace_a_foreign_class():
    registry = MindFormerRegister.registry[MindFormerModuleType.LOSS]
    before = dict(registry)
    ms_xent_mindformers.register()
    ms_xent_mindformers.register()
    assert registry == before

    class Foreign(nn.Cell):
        pass

    registry["MsXentBCEWithLogitsLoss"] = Foreign
    try:
        with pytest.raises(RuntimeError, match="'MsXentBCEWithLogitsLoss' is already taken by"):
            ms_xent_mindformers.register()
        assert registry["MsXentCrossEntropyLoss"] is CrossEntropyLoss
        assert registry["MsXentBCEWithLogitsLoss"] is Foreign
    finally:
        registry["MsXentBCEWithLogitsLoss"] = BCEWithLogitsLoss


YAML = """\
loss:
  type: MsXentCrossEntropyLoss
  label_smoothing: 0.1
  lse_square_scale_for_zloss: 0.01
  ignore_index: 2
  weight: [1.0, 0.5, 2.0, 1.5, 1.0]
  check_for_nan_in_loss_and_grad: True
  parallel_config:
    data_parallel: 2
    model_parallel: 1
"""


def test_yaml_config_builds_a_working_loss(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text(YAML)
    config = MindFormerConfig(str(path))
    loss = build_loss(config.loss)
    assert type(loss) is CrossEntropyLoss
    assert (loss.data_parallel, loss.model_parallel, loss.ignore_index) == (2, 1, 2)
    assert loss.check_for_nan_in_loss_and_grad

    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 5)).astype(np.float32)
    label = np.array([0, 1, 2, 3, 4, 2, 1, 0, 3], np.int32)
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0], np.float32)
    value = loss(ms.Tensor(x), ms.Tensor(label), ms.Tensor(mask))
    expected, _ = torch_masked_cross_entropy(x, label, mask, [1.0, 0.5, 2.0, 1.5, 1.0],
                                             ignore_index=2, label_smoothing=0.1,
                                             zloss_scale=0.01)
    assert_close(value, [expected], ms.float32)


def test_import_writes_nothing_to_the_working_directory(tmp_path):
    """A fresh interpreter without LOG_MF_PATH / OM_MODULES_CACHE, run in an empty directory."""
    script = (
        "import json, os\n"
        "import ms_xent.mindformers\n"
        "from ms_xent._backends.cpu.build import cache_root\n"
        "print(json.dumps({'root': cache_root(), 'log': os.environ['LOG_MF_PATH'],\n"
        "                  'modules': os.environ['OM_MODULES_CACHE']}))\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("LOG_MF_PATH", "OM_MODULES_CACHE")}
    env["PYTHONPATH"] = REPO_ROOT
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert paths["log"] == os.path.join(paths["root"], "mindformers", "log")
    assert paths["modules"] == os.path.join(paths["root"], "mindformers", "modules")
    assert list(tmp_path.iterdir()) == []


VOCAB, HIDDEN, BATCH, SEQ, STEPS = 32, 16, 4, 6, 12


class TinyLanguageModel(nn.Cell):
    """Embedding + linear head with fixed initial weights; logits [B, S, V]."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.embedding = nn.Embedding(VOCAB, HIDDEN, embedding_table=ms.Tensor(
            rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32) * 0.5))
        self.head = nn.Dense(HIDDEN, VOCAB, weight_init=ms.Tensor(
            rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32) * 0.5), bias_init="zeros")

    def construct(self, tokens):
        return self.head(self.embedding(tokens))


class MindFormersLossOnBatches(nn.Cell):
    """MindFormers' loss as a two-argument loss_fn: flattens and counts every position."""

    def __init__(self):
        super().__init__()
        self.loss = MindFormersCrossEntropyLoss()

    def construct(self, logits, labels):
        labels = labels.reshape((-1,))
        return self.loss(logits.reshape((-1, logits.shape[-1])), labels,
                         ops.ones(labels.shape, ms.float32))


class RecordLoss(Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_step_end(self, run_context):
        self.losses.append(float(run_context.original_args().net_outputs.asnumpy().reshape(-1)[0]))


def train(loss_fn):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, (BATCH * 3, SEQ)).astype(np.int32)
    labels = ((tokens * 7 + 3) % VOCAB).astype(np.int32)  # a learnable token-to-token map
    data = ds.NumpySlicesDataset({"tokens": tokens, "labels": labels}, shuffle=False).batch(BATCH)
    net = TinyLanguageModel()
    model = Model(net, loss_fn=loss_fn, optimizer=nn.Momentum(net.trainable_params(), 0.5, 0.9))
    record = RecordLoss()
    model.train(STEPS // 3, data, callbacks=[record], dataset_sink_mode=False)
    return np.array(record.losses)


def test_model_train_matches_mindformers_step_by_step():
    ms.set_context(mode=ms.GRAPH_MODE)
    ours = train(CrossEntropyLoss())
    theirs = train(MindFormersLossOnBatches())
    print(f"\nModel.train losses, ms_xent: {np.array2string(ours, precision=6)}"
          f"\nmax abs difference vs MindFormers over {STEPS} steps: "
          f"{np.abs(ours - theirs).max():.2e}")
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < 0.5 * ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
