"""MindFormers in practice (ms_xent.mindformers, configs/, scripts/): the YAML configs build a Llama
whose loss is ms_xent's, its training loss matches a float64 oracle and MindFormers' own loss
step for step, the main job (scripts/train.py) trains through both routes to the same result,
the Ascend config is refused on CPU, and a 2-worker msrun data-parallel run reproduces the
single-process losses and parameters."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from mindformers import MindFormerConfig
from mindformers.core import CrossEntropyLoss as MindFormersCrossEntropyLoss
from mindformers.core.parallel_config import build_parallel_config
from mindformers.models import build_network
from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper import MFTrainOneStepCell

from ms_xent.mindformers.models import MsXentLlamaForCausalLM, build_model_loss
from ms_xent.nn.linear_cross_entropy_loss import LinearCrossEntropyLoss
from ms_xent.mindformers.train_step import MsXentTrainOneStepCell
from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
from tests.reference import torch_masked_cross_entropy

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "configs" / "tiny_llama_ms_xent.yaml"
DP2_CONFIG = REPO_ROOT / "configs" / "tiny_llama_ms_xent_dp2.yaml"
ASCEND_CONFIG = REPO_ROOT / "configs" / "llama2_7b_ms_xent_ascend.yaml"
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
MSRUN_SCRIPT = REPO_ROOT / "scripts" / "msrun_train.py"
# The training job (loop, corpus, progress bar) lives with the scripts, not in the library.
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from _training import DeviceUnavailableError, load_config, pattern_corpus  # noqa: E402  pylint: disable=wrong-import-position

TINY_LLAMA = dict(batch_size=4, seq_length=16, vocab_size=64, hidden_size=32, num_layers=1,
                  num_heads=2, intermediate_size=64, compute_dtype="float32",
                  layernorm_compute_type="float32", softmax_compute_type="float32",
                  rotary_dtype="float32", param_init_type="float32", use_rope_slice=True,
                  fused_rms_norm=False, use_flash_attention=False)
# Steps of the subprocess runs: enough for the loss to fall past the 4 warm-up steps.
JOB_STEPS = 8
# ms_xent's and MindFormers' losses (and the routes / the data-parallel run) accumulate in float32
# in different orders; over a few Adam steps their results stay this close.
TRAINING_PARITY_ATOL = 1e-5
SUBPROCESS_TIMEOUT_S = 600


def tiny_llama(loss=None, seed=0, cls=MsXentLlamaForCausalLM):
    ms.set_seed(seed)
    np.random.seed(seed)
    extra = {} if loss is None else {"loss": loss}
    return cls(LlamaConfig(**TINY_LLAMA, **extra))


def token_batches(n_batches, seed=1):
    """[n_batches, B, S + 1] int32 tokens of the generated pattern corpus."""
    corpus = pattern_corpus(n_batches * TINY_LLAMA["batch_size"], TINY_LLAMA["seq_length"] + 1,
                            TINY_LLAMA["vocab_size"], seed)
    return corpus.reshape(n_batches, TINY_LLAMA["batch_size"], -1)


def train_steps(network, batches):
    """Losses and final parameters of one Adam step per batch, through a TrainOneStepCell."""
    optimizer = nn.Adam(network.trainable_params(), learning_rate=1e-2)
    step = nn.TrainOneStepCell(network, optimizer)
    step.set_train()
    losses = [float(step(ms.Tensor(tokens)).asnumpy().reshape(-1)[0]) for tokens in batches]
    return np.array(losses), {p.name: p.asnumpy() for p in network.trainable_params()}


def run_job(args, output_dir, cwd, script=TRAIN_SCRIPT):
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["GLOG_v"] = "3"
    return subprocess.run([sys.executable, str(script), *args, "--output-dir", str(output_dir)],
                          cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, check=False)


def job_results(output_dir, rank=0):
    """(metrics.json dict, {name: ndarray} of final.ckpt) of one rank of a finished job."""
    rank_dir = Path(output_dir) / f"rank_{rank}"
    metrics = json.loads((rank_dir / "metrics.json").read_text())
    params = {name: p.asnumpy() for name, p in
              ms.load_checkpoint(str(rank_dir / "final.ckpt")).items()}
    return metrics, params


def max_param_diff(first, second):
    assert sorted(first) == sorted(second)
    return max(float(np.abs(first[name] - second[name]).max()) for name in first)


# --- registration and the YAML configs --------------------------------------------------------

@pytest.mark.parametrize("module_type, name, cls, own_name, own_cls", [
    (MindFormerModuleType.MODELS, "MsXentLlamaForCausalLM", MsXentLlamaForCausalLM,
     "LlamaForCausalLM", LlamaForCausalLM),
    (MindFormerModuleType.WRAPPER, "MsXentTrainOneStepCell", MsXentTrainOneStepCell,
     "MFTrainOneStepCell", MFTrainOneStepCell),
])
def test_prefixed_names_are_registered_beside_mindformers_own(module_type, name, cls, own_name,
                                                              own_cls):
    assert MindFormerRegister.get_cls(module_type, name) is cls
    assert MindFormerRegister.get_cls(module_type, own_name) is own_cls


def test_tiny_config_builds_a_llama_whose_loss_is_ms_xent():
    config = MindFormerConfig(str(TINY_CONFIG))
    build_parallel_config(config)
    network = build_network(config.model, default_args={"parallel_config": config.parallel_config})
    assert type(network) is MsXentLlamaForCausalLM  # pylint: disable=unidiomatic-typecheck
    assert type(network.loss) is CrossEntropyLoss  # pylint: disable=unidiomatic-typecheck
    assert (network.loss.label_smoothing, network.loss.zloss_scale) == (0.0, 0.0)
    assert (network.loss.data_parallel, network.loss.model_parallel) == (1, 1)


def test_dp2_config_is_the_tiny_config_split_over_two_workers():
    single, dp2 = MindFormerConfig(str(TINY_CONFIG)), MindFormerConfig(str(DP2_CONFIG))
    assert dp2.use_parallel and not single.use_parallel
    assert dp2.parallel.parallel_mode == 0 and dp2.parallel.gradients_mean
    assert dp2.parallel_config.data_parallel == 2
    assert 2 * dp2.runner_config.batch_size == single.runner_config.batch_size
    assert dp2.model.model_config.disable_lazy_inline
    for key in ("seq_length", "vocab_size", "hidden_size", "num_layers", "loss"):
        assert dp2.model.model_config[key] == single.model.model_config[key], key
    for section in ("optimizer", "lr_schedule", "runner_wrapper", "seed"):
        assert dp2[section] == single[section], section


def test_ascend_config_is_refused_on_cpu_with_a_clear_message():
    with pytest.raises(DeviceUnavailableError, match=r"device_target='Ascend'.*tiny_llama"):
        load_config(ASCEND_CONFIG)


def test_ascend_config_loss_section_builds_ms_xent_loss_on_its_layout():
    """The 7B layout (dp 4 x mp 2, vocab_emb_dp) gives the loss whole-vocabulary logits rows."""
    config = MindFormerConfig(str(ASCEND_CONFIG))
    build_parallel_config(config)
    model_config = LlamaConfig(**{key: value for key, value in config.model.model_config.items()
                                  if key != "type"}, parallel_config=config.parallel_config)
    loss = build_model_loss(model_config)
    assert type(loss) is CrossEntropyLoss  # pylint: disable=unidiomatic-typecheck
    assert (loss.data_parallel, loss.model_parallel) == (4, 1)
    assert loss.zloss_scale == pytest.approx(1e-4)
    assert config.model.arch.type == "MsXentLlamaForCausalLM"


@pytest.mark.parametrize("parallel_mode, expected_mp", [
    ("data_parallel", 1), ("semi_auto_parallel", 2)])
def test_loss_sees_vocabulary_shards_only_where_lm_head_makes_them(parallel_mode, expected_mp):
    """Under DATA_PARALLEL every rank holds whole logits even with model_parallel 2 in the config:
    the loss must not read them as vocabulary shards. Under semi-auto (Ascend) it does."""
    config = MindFormerConfig(str(ASCEND_CONFIG))
    config.parallel_config.vocab_emb_dp = False
    build_parallel_config(config)
    model_config = LlamaConfig(**{key: value for key, value in config.model.model_config.items()
                                  if key != "type"}, parallel_config=config.parallel_config)
    ms.set_auto_parallel_context(parallel_mode=parallel_mode)
    try:
        loss = build_model_loss(model_config)
    finally:
        ms.reset_auto_parallel_context()
    assert (loss.data_parallel, loss.model_parallel) == (4, expected_mp)


@pytest.mark.parametrize("loss_config, match", [
    ("MsXentCrossEntropyLoss", "must be a mapping with a 'type' key"),
    ({"label_smoothing": 0.1}, "must be a mapping with a 'type' key"),
    ({"type": "NoSuchLoss"}, "NoSuchLoss"),
])
def test_bad_loss_config_is_rejected(loss_config, match):
    with pytest.raises((ValueError, KeyError), match=match):
        tiny_llama(loss=loss_config)


# --- the model's training loss --------------------------------------------------------------

def test_training_loss_matches_float64_oracle_with_options(mode):
    """Loss options from model_config.loss reach the loss; checked against torch float64."""
    options = {"type": "MsXentCrossEntropyLoss", "label_smoothing": 0.1,
               "lse_square_scale_for_zloss": 1e-3}
    network = tiny_llama(loss=options)
    tokens = token_batches(1)[0]
    labels = tokens[:, 1:].copy()
    labels[0, :3] = -100
    network.set_train(False)
    logits = network(ms.Tensor(tokens[:, :-1]))[0].asnumpy().reshape(-1, TINY_LLAMA["vocab_size"])
    network.set_train(True)
    loss = network(ms.Tensor(tokens), ms.Tensor(np.concatenate([tokens[:, :1], labels], axis=1)))
    mask = (labels.reshape(-1) != -100).astype(np.float64)
    expected, _ = torch_masked_cross_entropy(logits, labels.reshape(-1), mask=mask,
                                             label_smoothing=0.1, zloss_scale=1e-3)
    np.testing.assert_allclose(loss.asnumpy(), [expected], rtol=2e-5, err_msg=mode)


def test_forward_and_gradients_match_mindformers_llama(mode):
    """Same parameters, same loss class: the split training forward is MindFormers' forward."""
    reference = tiny_llama(cls=LlamaForCausalLM)
    network = tiny_llama(loss={"type": MindFormersCrossEntropyLoss})
    ms.load_param_into_net(network, reference.parameters_dict())
    tokens = ms.Tensor(token_batches(1)[0])
    for cell in (reference, network):
        cell.set_train(True)
    grads = [ms.value_and_grad(cell, None, cell.trainable_params())(tokens)
             for cell in (reference, network)]
    np.testing.assert_array_equal(grads[0][0].asnumpy(), grads[1][0].asnumpy(), err_msg=mode)
    for expected, actual in zip(grads[0][1], grads[1][1]):
        np.testing.assert_array_equal(actual.asnumpy(), expected.asnumpy(), err_msg=mode)


def test_fused_linear_loss_from_yaml_matches_the_logits_loss(mode):
    """model_config.loss = MsXentLinearCrossEntropyLoss: same loss and gradients as computing the
    logits with lm_head and applying CrossEntropyLoss, without forming the logits."""
    reference = tiny_llama(loss={"type": "MsXentCrossEntropyLoss", "label_smoothing": 0.1})
    network = tiny_llama(loss={"type": "MsXentLinearCrossEntropyLoss", "label_smoothing": 0.1})
    assert isinstance(network.loss, LinearCrossEntropyLoss) and network.fused_linear_loss
    ms.load_param_into_net(network, reference.parameters_dict())
    tokens = ms.Tensor(token_batches(1)[0])
    for cell in (reference, network):
        cell.set_train(True)
    (expected, expected_grads), (actual, actual_grads) = [
        ms.value_and_grad(cell, None, cell.trainable_params())(tokens)
        for cell in (reference, network)]
    np.testing.assert_allclose(actual.asnumpy(), expected.asnumpy(), rtol=1e-6, err_msg=mode)
    for want, got in zip(expected_grads, actual_grads):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-4,
                                   atol=1e-6 * max(np.abs(want.asnumpy()).max(), 1e-30),
                                   err_msg=mode)


def test_training_steps_match_mindformers_loss(mode):
    """Same seed and data: training with ms_xent's loss follows training with MindFormers'."""
    batches = token_batches(4)
    ours, theirs = tiny_llama(), tiny_llama(loss={"type": "CrossEntropyLoss"})
    assert isinstance(ours.loss, CrossEntropyLoss)
    assert isinstance(theirs.loss, MindFormersCrossEntropyLoss)
    ours_losses, ours_params = train_steps(ours, batches)
    mf_losses, mf_params = train_steps(theirs, batches)
    np.testing.assert_allclose(ours_losses, mf_losses, rtol=0, atol=TRAINING_PARITY_ATOL,
                               err_msg=mode)
    assert max_param_diff(ours_params, mf_params) < TRAINING_PARITY_ATOL
    assert ours_losses[-1] < ours_losses[0]


def test_train_step_cell_reports_non_finite_gradients(mode):
    """The CPU overflow check: finite gradients step the optimizer, NaN gradients skip it."""
    network = tiny_llama()
    optimizer = nn.SGD(network.trainable_params(), learning_rate=0.1)
    step = MsXentTrainOneStepCell(network, optimizer, scale_sense=1.0)
    step.set_train()
    tokens = ms.Tensor(token_batches(1)[0])
    before = network.lm_head.weight.asnumpy().copy()
    loss, overflow = step(tokens)[:2]
    assert np.isfinite(loss.asnumpy()).all() and not bool(overflow.asnumpy()), mode
    assert not np.array_equal(network.lm_head.weight.asnumpy(), before)

    network.lm_head.weight.set_data(ms.Tensor(np.full(before.shape, np.nan, np.float32)))
    stepped = network.model.norm_out.weight.asnumpy().copy()
    loss, overflow = step(tokens)[:2]
    assert bool(overflow.asnumpy()), mode
    np.testing.assert_array_equal(network.model.norm_out.weight.asnumpy(), stepped)


# --- the main job: scripts/train.py -----------------------------------------------------------

@pytest.fixture(scope="module", name="single_process_job")
def single_process_job_fixture(tmp_path_factory):
    """``python scripts/train.py --steps 8`` (default config, Model.train route) in an empty CWD."""
    cwd = tmp_path_factory.mktemp("cwd")
    output_dir = tmp_path_factory.mktemp("job_model")
    completed = run_job(["--steps", str(JOB_STEPS)], output_dir, cwd)
    return completed, output_dir, cwd


def test_train_script_trains_and_exits_zero(single_process_job):
    completed, output_dir, cwd = single_process_job
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    metrics, params = job_results(output_dir)
    losses = metrics["losses"]
    assert len(losses) == JOB_STEPS and losses[-1] < losses[0]
    assert losses[0] == pytest.approx(np.log(MindFormerConfig(str(TINY_CONFIG))
                                             .model.model_config.vocab_size), abs=0.05)
    for step, loss in enumerate(losses, 1):
        assert f"step {step:4d}/{JOB_STEPS}  loss {loss:.6f}" in completed.stdout
    assert f"loss {losses[0]:.6f} -> {losses[-1]:.6f}" in completed.stdout
    # The config's loss records the token accuracy; the job prints and stores it per step.
    accuracies = metrics["token_accuracies"]
    assert len(accuracies) == JOB_STEPS and all(0 <= value <= 1 for value in accuracies)
    for step, (loss, accuracy) in enumerate(zip(losses, accuracies), 1):
        assert f"loss {loss:.6f}  token accuracy {accuracy:.4f}" in completed.stdout
    assert "%|" in completed.stderr + completed.stdout  # the tqdm progress bar
    assert "lm_head.weight" in params
    assert not list(cwd.iterdir()), "the job wrote into the working directory"
    assert (output_dir / "log").is_dir()


def test_trainer_route_gives_the_model_route_result(single_process_job, tmp_path):
    completed, model_dir, _ = single_process_job
    assert completed.returncode == 0, completed.stderr[-3000:]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    trainer = run_job(["--steps", str(JOB_STEPS), "--route", "trainer"], tmp_path / "out", cwd)
    assert trainer.returncode == 0, trainer.stdout[-3000:] + trainer.stderr[-3000:]
    model_metrics, model_params = job_results(model_dir)
    trainer_metrics, trainer_params = job_results(tmp_path / "out")
    np.testing.assert_allclose(trainer_metrics["losses"], model_metrics["losses"], rtol=0,
                               atol=TRAINING_PARITY_ATOL)
    assert max_param_diff(trainer_params, model_params) < TRAINING_PARITY_ATOL
    assert "{'adapter_id'" not in trainer.stdout  # the Trainer's config printout went to a file
    assert (tmp_path / "out" / "rank_0" / "mindformers_console.log").stat().st_size > 0
    assert not list(cwd.iterdir())


def test_train_script_refuses_the_ascend_config(tmp_path, monkeypatch, capsys):
    """Exit code 2 and the reason on stderr (run in-process: MindFormers is already imported)."""
    for name in ("LOG_MF_PATH", "OM_MODULES_CACHE", "LOCAL_DEFAULT_PATH", "MS_OM_PATH", "GLOG_v"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after main() changes them
    spec = importlib.util.spec_from_file_location("ms_xent_train_script", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", str(ASCEND_CONFIG), "--output-dir", str(tmp_path)]) == 2
    assert "device_target='Ascend'" in capsys.readouterr().err


# --- msrun data parallel ---------------------------------------------------------------------

@pytest.mark.slow
def test_msrun_data_parallel_matches_single_process(single_process_job, tmp_path):
    """2 workers x 4 sequences = the single process's 8: same global loss, same parameters."""
    completed, single_dir, _ = single_process_job
    assert completed.returncode == 0, completed.stderr[-3000:]
    msrun = run_job(["--steps", str(JOB_STEPS), "--timeout", str(SUBPROCESS_TIMEOUT_S - 60)],
                    tmp_path / "out", tmp_path, script=MSRUN_SCRIPT)
    worker_logs = "".join(log.read_text(errors="replace")[-2000:] for log in
                          sorted((tmp_path / "out" / "msrun_log").glob("*.log")))
    assert msrun.returncode == 0, msrun.stdout[-2000:] + msrun.stderr[-2000:] + worker_logs
    single_metrics, single_params = job_results(single_dir)
    ranks = [job_results(tmp_path / "out", rank) for rank in (0, 1)]
    global_losses = np.mean([metrics["losses"] for metrics, _ in ranks], axis=0)
    loss_diff = float(np.abs(global_losses - single_metrics["losses"]).max())
    param_diffs = [max_param_diff(params, single_params) for _, params in ranks]
    print(f"msrun 2-worker vs single process: max |loss diff| {loss_diff:.3g}, "
          f"max |param diff| {max(param_diffs):.3g}")
    assert loss_diff < TRAINING_PARITY_ATOL
    assert max(param_diffs) < TRAINING_PARITY_ATOL
    assert [metrics["group_size"] for metrics, _ in ranks] == [2, 2]
    # The two workers saw different halves of each batch.
    assert ranks[0][0]["losses"][0] != ranks[1][0]["losses"][0]
