"""Launch scripts/train.py as a data-parallel job with msrun (2 CPU workers by default).

    python scripts/msrun_train.py                      # tiny Llama, 2 workers, Model.train route
    python scripts/msrun_train.py --route trainer      # same through mindformers.Trainer

msrun starts every worker with the `python` found on PATH, so this launcher puts its own
interpreter's bin directory (the venv's) first. The master port is a free port unless
--master-port is given. Worker logs (msrun --log_dir), MindFormers logs and each rank's
metrics.json / final.ckpt go to --output-dir (default
~/.cache/ms_xent/runs/msrun-<timestamp>-<pid>).
At the end it prints the global-batch loss (the mean of the workers' losses) and exits 0 when
msrun succeeded and that loss fell; otherwise it exits msrun's code or 1.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_llama_ms_xent_dp2.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"use_parallel MindFormers config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--workers", type=int, default=2, help="number of workers (default: 2)")
    parser.add_argument("--route", choices=("model", "trainer"), default="model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--master-port", type=int, default=None,
                        help="msrun master port (default: a free port)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before the job is killed (default: 600)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (first and last loss are compared), got {args.steps}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not args.config.is_file():
        parser.error(f"--config: no such file: {args.config}")
    return args


def free_port():
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun_command(args, output_dir, port):
    return [
        "msrun", f"--worker_num={args.workers}", f"--local_worker_num={args.workers}",
        f"--master_port={port}", f"--log_dir={output_dir / 'msrun_log'}", "--join=True",
        str(TRAIN_SCRIPT), "--config", str(args.config.resolve()), "--route", args.route,
        "--steps", str(args.steps), "--output-dir", str(output_dir),
    ]


def msrun_environment():
    """This interpreter's bin directory first on PATH (msrun runs `python`), quiet MindSpore."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("GLOG_v", "3")
    return env


def global_losses(output_dir, workers):
    """Per-step mean of the workers' losses (each worker's loss is over its share of the batch)."""
    per_rank = [json.loads((output_dir / f"rank_{rank}" / "metrics.json").read_text())
                for rank in range(workers)]
    losses = [statistics.fmean(step) for step in zip(*(m["losses"] for m in per_rank))]
    step_seconds = [max(step) for step in zip(*(m["step_seconds"] for m in per_rank))]
    return losses, step_seconds


def main(argv=None):
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir = (args.output_dir or Path.home() / ".cache" / "ms_xent" / "runs" /
                  f"msrun-{stamp}-{os.getpid()}").resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    port = args.master_port or free_port()
    command = msrun_command(args, output_dir, port)
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=output_dir, env=msrun_environment(),
                                   timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"error: msrun did not finish within {args.timeout:.0f} s; worker logs: "
              f"{output_dir / 'msrun_log'}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        print(f"error: msrun exited with {completed.returncode}; worker logs: "
              f"{output_dir / 'msrun_log'}", file=sys.stderr)
        return completed.returncode
    losses, step_seconds = global_losses(output_dir, args.workers)
    print(f"{args.workers} workers, route {args.route}, {len(losses)} steps, "
          f"wall time {wall:.1f} s")
    print(f"global-batch loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    print(f"step time: median {statistics.median(step_seconds[1:]) * 1000:.1f} ms after the "
          f"first step (slowest worker)")
    print(f"outputs (worker logs in msrun_log/, metrics.json, final.ckpt): {output_dir}")
    if not losses[-1] < losses[0]:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
