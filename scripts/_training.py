"""Training a MindFormers config with ``ms_xent``'s loss: the job behind ``scripts/train.py`` (not
part of the library: library code runs no job; the scripts import it from their directory).

Two routes train the same network from the same YAML config:

- ``"model"``: plain MindSpore, ``mindspore.train.Model(network, optimizer).train(...)``, with the
  network, optimizer and learning-rate schedule built from the config's ``model``, ``optimizer``
  and ``lr_schedule`` sections;
- ``"trainer"``: ``mindformers.Trainer`` driven by the whole config (its ``runner_wrapper`` must be
  ``MsXentTrainOneStepCell`` on CPU, see :mod:`ms_xent.mindformers.train_step`).

The data is an embedded, generated corpus (:func:`pattern_corpus`), so nothing is downloaded.
Under ``use_parallel`` (launched by ``msrun``) every worker reads its slice of each global batch
(the whole global batch with semi-auto parallel ``full_batch``).
Each process writes ``rank_<r>/metrics.json`` (per-step losses and times) and
``rank_<r>/final.ckpt`` (the trained parameters) under the output directory.

Import this module after setting ``LOG_MF_PATH`` / ``OM_MODULES_CACHE`` (``scripts/train.py`` does),
since importing MindFormers creates its log directory.
"""

import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore.communication import get_group_size, get_rank
from mindspore.train import Callback, Model
from tqdm import tqdm

# First: registers the MsXent* names the configs use, and keeps MindFormers' import-time WARNINGs
# off the console (in $LOG_MF_PATH/import_console.log).
import ms_xent.mindformers  # noqa: F401  pylint: disable=unused-import
from mindformers import MindFormerConfig, Trainer, build_context
from mindformers.core.lr import build_lr
from mindformers.core.optim import build_optim
from mindformers.core.parallel_config import build_parallel_config
from mindformers.models import build_network
from mindformers.tools.logger import get_logger

from ms_xent.nn.token_accuracy import recorded_token_accuracy, token_accuracy_parameters

ROUTES = ("model", "trainer")
# Each sequence of the corpus walks the vocabulary with one of these strides.
PATTERN_STRIDES = (1, 2, 3, 5, 7)


class DeviceUnavailableError(RuntimeError):
    """The config targets a device this machine does not have."""


def pattern_corpus(num_sequences, length, vocab_size, seed):
    """A deterministic corpus of arithmetic token sequences, int32 [num_sequences, length].

    Sequence i is ``1 + (start_i + stride_i * t) mod (vocab_size - 1)`` for t = 0 .. length-1,
    with a random start and a stride from :data:`PATTERN_STRIDES`: the first tokens reveal the
    stride, after which every next token is predictable, so a model's loss falls well below
    ``log(vocab_size)`` within a few dozen steps. Token 0 (the configs' ``pad_token_id``) never
    occurs, so every position counts in the loss.
    """
    if vocab_size < 3:
        raise ValueError(f"pattern_corpus: vocab_size must be >= 3, got {vocab_size}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, vocab_size - 1, size=(num_sequences, 1))
    strides = rng.choice(PATTERN_STRIDES, size=(num_sequences, 1))
    positions = np.arange(length)[None, :]
    return (1 + (starts + strides * positions) % (vocab_size - 1)).astype(np.int32)


def _reads_full_batch(config):
    """Semi-auto / auto parallel with full_batch: every process reads the whole global batch."""
    parallel = config.parallel or {}
    return bool(config.use_parallel and parallel.get("full_batch")
                and parallel.get("parallel_mode") in (1, 2))


def pattern_dataset(config, steps, rank=0, group_size=1):
    """This process's share of ``steps`` global batches of :func:`pattern_corpus`.

    The per-device batch is ``runner_config.batch_size`` (B). In stand-alone and data-parallel
    runs the global batch is B * ``group_size`` and process ``rank`` reads rows
    ``[rank * B, (rank + 1) * B)`` of each, so a data-parallel run sees exactly the batches of a
    single process with a ``group_size`` times larger batch. With ``full_batch`` (semi-auto /
    auto parallel) every process reads the whole global batch of B * data_parallel rows and
    MindSpore splits it.
    """
    batch_size = config.runner_config.batch_size
    model_config = config.model.model_config
    if _reads_full_batch(config):
        batch_size *= config.parallel_config.data_parallel
        rank, group_size = 0, 1
    corpus = pattern_corpus(steps * batch_size * group_size, model_config.seq_length + 1,
                            model_config.vocab_size, config.seed)
    global_batches = corpus.reshape(steps, group_size, batch_size, -1)
    local_rows = global_batches[:, rank].reshape(steps * batch_size, -1)
    dataset = ds.NumpySlicesDataset({"input_ids": local_rows}, shuffle=False)
    return dataset.batch(batch_size, drop_remainder=True)


class TrainingProgress(Callback):
    """Progress bar, one loss line per step, and the record of losses and step times; with a loss
    Cell built with ``record_token_accuracy`` (the tiny configs), the token accuracy of the step
    too (read from the Cell's Parameter, see :mod:`ms_xent.nn.token_accuracy`)."""

    def __init__(self, total_steps, description, stream=None):
        super().__init__()
        self.total_steps = total_steps
        self.description = description
        self.stream = stream or sys.stdout
        self.losses = []
        self.token_accuracies = []
        self._accuracy_parameters = []
        self.step_seconds = []
        self.trainable_params = []
        self._bar = None
        self._step_start = 0.0

    def on_train_begin(self, run_context):
        self._accuracy_parameters = token_accuracy_parameters(
            run_context.original_args().train_network)
        self._bar = tqdm(total=self.total_steps, desc=self.description, unit="step",
                         file=self.stream, dynamic_ncols=True, mininterval=0.5)

    def on_train_step_begin(self, run_context):
        self._step_start = time.perf_counter()

    def on_train_step_end(self, run_context):
        seconds = time.perf_counter() - self._step_start
        outputs = run_context.original_args().net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        value = float(np.mean(loss.asnumpy()))
        self.losses.append(value)
        self.step_seconds.append(seconds)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{value:.4f}")
        accuracy = recorded_token_accuracy(self._accuracy_parameters)
        accuracy_text = ""
        if accuracy is not None:
            self.token_accuracies.append(accuracy)
            accuracy_text = f"  token accuracy {accuracy:.4f}"
        tqdm.write(f"step {len(self.losses):4d}/{self.total_steps}  loss {value:.6f}"
                   f"{accuracy_text}  {seconds * 1000:8.1f} ms", file=self.stream)

    def on_train_end(self, run_context):
        self._bar.close()
        self.trainable_params = run_context.original_args().train_network.network.trainable_params()


@dataclasses.dataclass
class TrainingResult:
    """What one process of a training run produced."""
    route: str
    config_path: str
    rank: int
    group_size: int
    losses: list
    token_accuracies: list
    step_seconds: list
    output_dir: str

    @property
    def loss_fell(self):
        return len(self.losses) > 1 and self.losses[-1] < self.losses[0]


def load_config(config_path):
    """The MindFormers config at ``config_path``, checked against this machine's devices."""
    config = MindFormerConfig(str(config_path))
    target = (config.context or {}).get("device_target", "CPU")
    if target != "CPU" and not ms.hal.is_available(target):
        raise DeviceUnavailableError(
            f"{config_path} targets device_target={target!r}, which this machine does not have "
            f"(MindSpore sees no {target} device). It describes the {target} deployment; on CPU "
            f"use configs/tiny_llama_ms_xent.yaml (or its _dp2 variant under msrun).")
    return config


def _setup_runtime(config, output_dir):
    """Context (mode, device, communication under use_parallel); returns (rank, group_size)."""
    config.output_dir = str(Path(output_dir) / "mindformers")
    build_context(config)
    build_parallel_config(config)
    if config.use_parallel:
        return get_rank(), get_group_size()
    return 0, 1


def _train_with_model(config, dataset, progress, steps):
    ms.set_seed(config.seed)
    np.random.seed(config.seed)
    network = build_network(config.model, default_args={"parallel_config": config.parallel_config,
                                                        "moe_config": config.moe_config})
    learning_rate = build_lr(config.lr_schedule, default_args={"total_steps": steps})
    optimizer = build_optim(config.optimizer, default_args={
        "params": network.trainable_params(), "learning_rate": learning_rate})
    Model(network, optimizer=optimizer).train(1, dataset, callbacks=[progress],
                                              dataset_sink_mode=False)


def _train_with_trainer(config, dataset, progress, console):
    with contextlib.redirect_stdout(console):
        trainer = Trainer(args=config, task="text_generation", train_dataset=dataset,
                          callbacks=[progress])
        trainer.train()


def _quiet_mindformers_console():
    """Only errors from MindFormers' logger on the console (its files keep every level)."""
    for handler in get_logger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler,
                                                                         logging.FileHandler):
            handler.setLevel(logging.ERROR)


def train(config_path, output_dir, route="model", steps=40, quiet=True):
    """Trains ``config_path`` for ``steps`` steps on :func:`pattern_dataset` via ``route``.

    Writes ``rank_<r>/metrics.json`` and ``rank_<r>/final.ckpt`` under ``output_dir`` and returns
    this process's :class:`TrainingResult`. With ``quiet``, MindFormers' console output (INFO and
    WARNING log lines, the Trainer's printout of the whole config) goes to
    ``<output_dir>/rank_<r>/mindformers_console.log`` and the MindFormers log files only; the
    progress bar and the loss lines stay on stdout.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 to compare the first and the last loss, got {steps}")
    if quiet:
        _quiet_mindformers_console()
    config = load_config(config_path)
    rank, group_size = _setup_runtime(config, output_dir)
    dataset = pattern_dataset(config, steps, rank, group_size)
    worker = f" rank {rank}/{group_size}" if group_size > 1 else ""
    progress = TrainingProgress(steps, f"{route}{worker}")
    rank_dir = Path(output_dir) / f"rank_{rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    if route == "model":
        _train_with_model(config, dataset, progress, steps)
    else:
        console_log = rank_dir / "mindformers_console.log"
        with (open(console_log, "w", encoding="utf-8") if quiet
              else contextlib.nullcontext(sys.stdout)) as console:
            _train_with_trainer(config, dataset, progress, console)

    ms.save_checkpoint([{"name": param.name, "data": param} for param in progress.trainable_params],
                       str(rank_dir / "final.ckpt"))
    result = TrainingResult(route=route, config_path=str(config_path), rank=rank,
                            group_size=group_size, losses=progress.losses,
                            token_accuracies=progress.token_accuracies,
                            step_seconds=progress.step_seconds, output_dir=str(output_dir))
    (rank_dir / "metrics.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
    return result
