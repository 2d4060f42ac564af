"""Launching a worker script under msrun from a test: local CPU workers, a free port, the venv's
``python`` first on PATH (msrun starts ``python`` from PATH), the workers' log tails on failure."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ms_xent._backends import dispatch

MSRUN_TIMEOUT_S = 900


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tails(log_dir, lines=40):
    tails = []
    for log in sorted(Path(log_dir).glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        tails.append(f"==> {log.name} <==\n" + "\n".join(text[-lines:]))
    return "\n".join(tails)


def run_msrun(script, out_dir, workers=2):
    """Runs ``script out_dir`` under msrun with ``workers`` local CPU workers; returns seconds.

    The workers run on the backend active here (``ms_xent.use_backend`` does not cross process
    boundaries: it is passed as ``MS_XENT_BACKEND``)."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", GLOG_v="3",
               MS_XENT_BACKEND=dispatch.requested_backend())
    log_dir = Path(out_dir) / "msrun_logs"
    command = [str(bin_dir / "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
               f"--master_port={free_port()}", f"--log_dir={log_dir}", "--join=True",
               str(script), str(out_dir)]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=out_dir, env=env, capture_output=True, text=True,
                                   timeout=MSRUN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"msrun did not finish in {MSRUN_TIMEOUT_S} s\n{log_tails(log_dir)}")
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        pytest.fail(f"msrun exited with {completed.returncode}\n{completed.stdout[-2000:]}\n"
                    f"{completed.stderr[-2000:]}\n{log_tails(log_dir)}")
    return seconds
