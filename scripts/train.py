"""Train a MindFormers Llama with ms_xent's cross-entropy loss: ms_xent's main job.

With no arguments, trains the tiny Llama of configs/tiny_llama_ms_xent.yaml on CPU for 40 steps
on an embedded generated corpus, prints a progress bar and one loss line per step, and exits 0
when the last loss is lower than the first (1 otherwise, 2 on a config / device error, e.g. a
use_parallel config run without msrun).

    python scripts/train.py                                  # tiny Llama, Model.train route
    python scripts/train.py --route trainer                  # same, through mindformers.Trainer
    python scripts/train.py --config configs/X.yaml --steps 10 --output-dir /tmp/run

Every MindFormers / MindSpore log and output goes to --output-dir (default
~/.cache/ms_xent/runs/<timestamp>-<pid>), never to the current directory. Under msrun
(scripts/msrun_train.py) each worker runs this script with a use_parallel config. The training
loop, corpus and progress bar are in scripts/_training.py.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# _training.py sits next to this script (on sys.path when run as a script; added for importers).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_llama_ms_xent.yaml"
DEFAULT_STEPS = 40


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"MindFormers YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--route", choices=("model", "trainer"), default="model",
                        help="'model': mindspore.train.Model(...).train(...); "
                             "'trainer': mindformers.Trainer from the YAML (default: model)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where logs, metrics and the final checkpoint go "
                             "(default: ~/.cache/ms_xent/runs/<timestamp>-<pid>)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show MindFormers' console output (INFO / WARNING log lines, "
                             "the Trainer's config printout); it always goes to <output-dir>")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (first and last loss are compared), got {args.steps}")
    if not args.config.is_file():
        parser.error(f"--config: no such file: {args.config}")
    return args


def launched_without_msrun(config_path):
    """True for a ``use_parallel`` config run as a plain process: its workers need msrun's
    scheduler (msrun sets MS_ROLE in every worker; a rank table file is the other launcher)."""
    import yaml  # pylint: disable=import-outside-toplevel
    with open(config_path, encoding="utf-8") as stream:
        config = yaml.safe_load(stream) or {}
    launched = os.environ.get("MS_ROLE") or os.environ.get("RANK_TABLE_FILE")
    # A config for another device is refused first by the device check (exit code 2 as well).
    on_cpu = (config.get("context") or {}).get("device_target", "CPU") == "CPU"
    return bool(config.get("use_parallel")) and on_cpu and not launched


def default_output_dir():
    """A fresh run directory under ~/.cache/ms_xent/runs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path.home() / ".cache" / "ms_xent" / "runs" / f"{stamp}-{os.getpid()}"


def redirect_outputs(output_dir):
    """Sends MindFormers' logs, outputs and module cache, and MindSpore's files, to ``output_dir``.

    Must run before MindSpore / MindFormers are imported: each of them defaults to a path under
    the working directory (``./output``, ``./modules``, ``./rank_0/om``).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ["LOG_MF_PATH"] = str(output_dir / "log")
    os.environ["OM_MODULES_CACHE"] = str(output_dir / "modules")
    os.environ["LOCAL_DEFAULT_PATH"] = str(output_dir / "mindformers")
    os.environ["MS_OM_PATH"] = str(output_dir / "om")
    os.environ.setdefault("GLOG_v", "3")


def summarize(result):
    losses, seconds = result.losses, result.step_seconds
    worker = f", rank {result.rank} of {result.group_size}" if result.group_size > 1 else ""
    print(f"\nroute {result.route}, {Path(result.config_path).name}, {len(losses)} steps{worker}")
    print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    print(f"step time: median {statistics.median(seconds[1:]) * 1000:.1f} ms after the first step "
          f"(first step, with graph compilation: {seconds[0]:.2f} s)")
    print(f"outputs (logs, metrics.json, final.ckpt): {result.output_dir}")


def main(argv=None):
    args = parse_args(argv)
    config_path = args.config.resolve()
    if launched_without_msrun(config_path):
        print(f"error: {args.config} has use_parallel: True: this config needs msrun: use "
              f"scripts/msrun_train.py --config {args.config}", file=sys.stderr)
        return 2
    output_dir = (args.output_dir or default_output_dir()).resolve()
    redirect_outputs(output_dir)
    # pylint: disable=import-outside-toplevel
    from _training import DeviceUnavailableError, train
    try:
        result = train(config_path, route=args.route, steps=args.steps, output_dir=output_dir,
                       quiet=not args.verbose)
    except DeviceUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summarize(result)
    if not result.loss_fell:
        print(f"error: the loss did not fall ({result.losses[0]:.6f} -> {result.losses[-1]:.6f})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
