"""Side-by-side benchmark of cross-entropy losses on CPU: time, extra peak memory, memory bound.

Compares, for each logits shape N x C and dtype, the forward and the forward+backward of

* ``ms_xent_graph`` / ``ms_xent_pynative``: ``ms_xent.ops.cross_entropy_rows`` reduced to the mean
  (the memory-lean training path: no [N, C] output besides the gradient), GRAPH / PYNATIVE mode;
* ``ms_xent_composed_graph``: the ``ms_xent.nn.CrossEntropyLoss`` Cell with
  ``MS_XENT_BACKEND=composed`` (MindSpore primitives only: the path of devices without ms_xent's
  kernels), GRAPH mode;
* ``ms_xent_loss_graph`` / ``ms_xent_loss_pynative``: the public ``ms_xent.ops.cross_entropy_loss``
  (reduction "mean"; it also writes the [N, C] ``log_prob`` output);
* ``mindspore_graph`` / ``mindspore_pynative``: ``mindspore.nn.CrossEntropyLoss()``;
* ``mindformers_graph`` / ``mindformers_pynative``: ``mindformers.core.CrossEntropyLoss()`` with an
  ``input_mask`` of ones;
* ``torch``: ``torch.nn.functional.cross_entropy`` (when PyTorch is installed).

Method
------
Inputs: logits ~ N(0, 1) (bfloat16 = float32 rounded to nearest even), targets uniform in [0, C),
the same for every implementation (seeded). The loss is the mean over the N rows.

Interleaving: the timed repetitions of a case (shape, dtype) are spread over rounds; in each round
every implementation runs once, one after the other, each in a fresh subprocess (round-robin), so
a change of load on the machine hits all implementations alike. With the defaults (``--repeats 5
--reps-per-process 1``) that is 5 rounds of one timed repetition per subprocess; the reported time
is the median over all timed repetitions of the case.

One subprocess per (implementation, shape, dtype, round): it imports its framework, runs the
implementation once on a tiny input (loads the kernels, starts the thread pools; this is also how
an unsupported dtype is detected), creates the inputs, resets the peak-RSS counter
(``/proc/self/clear_refs`` = 5, so VmHWM restarts at the current RSS) and takes the current RSS as
the baseline, then runs ``--warmup`` untimed calls (GRAPH compilation happens here) and the timed
calls of the forward, reads VmHWM (forward peak), then the same for forward+backward and reads
VmHWM again. Extra peak memory = VmHWM - baseline: everything the loss and its gradient needed on
top of the inputs, including the gradient itself (1x the logits), memory a framework's pool keeps,
and graph compilation. The reported value is the maximum over the rounds.

Timing: ``time.perf_counter`` around one call followed by a full synchronisation (MindSpore:
``_pynative_executor.sync()``, its executor is asynchronous in both modes). Forward = the loss
value (PyTorch under ``torch.no_grad``); forward+backward = the gradient w.r.t. the logits
(``mindspore.grad`` compiled in a Cell in GRAPH mode, called directly in PYNATIVE;
``torch.autograd.grad``). Each result is freed before the next call.

Memory safety: before a case runs, its footprint is predicted (inputs + runtime + a
per-implementation multiple of the logits' size, from measurements on this kind of machine); a
case that would not fit in the free memory minus ``--mem-reserve-gb`` is recorded as skipped
(``--force`` runs it anyway). While a subprocess runs, its RSS is watched every 10 ms: it is
killed, and the case recorded as out of memory, when its RSS exceeds the cap (free memory at
launch minus the reserve, or ``--mem-cap-gb``) or the machine's available memory falls below
0.5 GiB. (RLIMIT_AS is not used: MindSpore and PyTorch reserve address space far beyond what they
touch, so a virtual-size cap misfires.) A subprocess that exceeds ``--timeout``, dies, or raises
is recorded as such; a case that fails in one round is not retried in later rounds. A pair
(implementation, dtype) that fails on a tiny input in the initial probe is recorded as
unsupported (dtype error) or failed for every shape.

Memory bandwidth. The VMs this was written on swing widely (read samples from 8 to 57 GB/s within
one run), so one figure for the whole run makes the fractions of the bound unreliable. Instead:

* Survey, at the start (and again at the end, for the header): every way to stream memory from
  Python that is at hand, on 1 GiB float32 buffers (far larger than the caches) split into one
  part per usable core, each part in its own thread, best of 7: reads by numpy's OR-reduction of
  64-bit words, max and sum (the sum is compute-limited: numpy's pairwise float32 sum), copies by
  ``np.copyto`` into a pre-touched buffer (bytes = read + written = 2x the buffer); PyTorch's
  multi-threaded sum and ``copy_`` as a cross-check when installed (not used for the bound: its
  OpenMP threads keep spinning after a call and would steal the cores from the call timed right
  after). The fastest numpy read and copy are the run's methods.
* Pairs: every worker samples read and copy bandwidth with those methods on ``--probe-mib``
  (256 MiB) buffers (better of 2 passes each, ~0.1 s) right before each timed call; each call's
  fraction of the bound uses its own sample. The fraction reported is the median over all timed
  calls of the case, with the range of the per-round medians as its spread; the buffers are
  allocated before the peak-memory baseline, so they do not count as extra peak.

``--bandwidth READ,COPY`` uses given values instead (no samples). results.md warns when the
machine was busy (load average at start above half the CPUs, or the two surveys more than 25%
apart).

Memory-traffic bound for S = N * C * itemsize bytes of logits: the forward reads the logits once,
the backward reads them once and writes the gradient once (a copy-like stream), so

    bound_fwd     = S / read_bw
    bound_fwd_bwd = S / read_bw + 2 S / copy_bw

(4096 x 8080 float32 at 25 and 32 GB/s: 5.3 + 8.3 = 13.6 ms). Fraction of the bound =
bound / measured time (1.0 = at the machine's memory speed at that moment). results.md ends with
a summary line per shape, dtype and mode of ms_xent (fraction of the bound, how many times
slower MindFormers' loss and PyTorch are, extra peak), the lines README's tables are built from.

Outputs, in ``--output-dir`` (default: a new ``~/.cache/ms_xent/bench/<timestamp>``, never the
current directory): ``results.md`` (machine, bandwidth, tables), ``results.png`` (chart),
``results.json`` (every measurement), ``logs/`` (each subprocess's output), ``work/`` (the
subprocesses' working directory: case specs and results, MindFormers' logs). The table is also
printed, and a progress bar is shown while it runs.

Cost: every subprocess pays the framework import (2-6 s, MindFormers the most), so the full
default run (4 shapes x 2 dtypes x 10 implementations x 5 rounds) takes about 1 to 1.5 hours on 2
cores; ``--reps-per-process 5`` (one round, no interleaving) or fewer ``--impls`` cut it down.

Examples::

    python scripts/bench.py                                   # full benchmark (quiet machine!)
    python scripts/bench.py --shapes 512x1000 --repeats 5     # quick check
    python scripts/bench.py --shapes 4096x8080 --dtypes float32 --impls ms_xent_graph,torch
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

DEFAULT_SHAPES = ("4096x8080", "8192x32000", "2048x128256", "4096x151936")
DEFAULT_DTYPES = ("float32", "bfloat16")
ITEMSIZE = {"float32": 4, "bfloat16": 2}
PROBE_SHAPE = (64, 1000)
TINY_SHAPE = (8, 128)
GIB = 1 << 30
MIB = 1 << 20
RUNTIME_OVERHEAD_BYTES = 1.5 * GIB
MACHINE_MEMORY_FLOOR_BYTES = 0.5 * GIB
WATCH_INTERVAL_S = 0.01
OUT_OF_MEMORY_PATTERN = re.compile(
    r"out of memory|memory not enough|not enough memory|MemoryError|bad_alloc|malloc|"
    r"alloc(ate|ation)? (device )?memory fail|failed to alloc", re.IGNORECASE)
UNSUPPORTED_PATTERN = re.compile(r"dtype|data type|bfloat16|BFloat16|not support", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One benchmarked loss. Predicted extra memory = fp32_factor * N*C*4 + native_factor * S."""
    name: str
    label: str
    framework: str
    mode: str
    fp32_factor: float
    native_factor: float


IMPLEMENTATIONS = {impl.name: impl for impl in (
    Implementation("ms_xent_graph", "ms_xent rows, GRAPH", "ms_xent", "graph", 0.0, 1.5),
    Implementation("ms_xent_pynative", "ms_xent rows, PYNATIVE", "ms_xent", "pynative", 0.0, 1.5),
    Implementation("ms_xent_composed_graph", "ms_xent CrossEntropyLoss, composed backend, GRAPH",
                   "ms_xent_composed", "graph", 3.0, 0.0),
    Implementation("ms_xent_loss_graph", "ms_xent cross_entropy_loss, GRAPH", "ms_xent_loss",
                   "graph", 0.0, 2.5),
    Implementation("ms_xent_loss_pynative", "ms_xent cross_entropy_loss, PYNATIVE", "ms_xent_loss",
                   "pynative", 0.0, 2.5),
    Implementation("mindspore_graph", "mindspore.nn.CrossEntropyLoss, GRAPH", "mindspore", "graph",
                   27.0, 0.0),
    Implementation("mindspore_pynative", "mindspore.nn.CrossEntropyLoss, PYNATIVE", "mindspore",
                   "pynative", 16.0, 0.0),
    Implementation("mindformers_graph", "mindformers.core.CrossEntropyLoss, GRAPH", "mindformers",
                   "graph", 25.0, 0.0),
    Implementation("mindformers_pynative", "mindformers.core.CrossEntropyLoss, PYNATIVE",
                   "mindformers", "pynative", 13.0, 0.0),
    Implementation("torch", "torch F.cross_entropy", "torch", "eager", 0.0, 3.2),
)}
REFERENCE_IMPL = "ms_xent_graph"


# ----------------------------------------------------------------------------------------------
# Inputs (shared by the workers and the parent's float64 reference loss)
# ----------------------------------------------------------------------------------------------

def rows_per_chunk(n_classes):
    return max(1, (16 * MIB) // n_classes)


def logits_chunks(n_rows, n_classes, dtype, seed):
    """Yields (row_start, chunk) of the logits: float32, or bfloat16 bit patterns as uint16."""
    rng = np.random.default_rng(seed)
    step = rows_per_chunk(n_classes)
    for start in range(0, n_rows, step):
        chunk = rng.standard_normal((min(step, n_rows - start), n_classes), dtype=np.float32)
        if dtype == "bfloat16":
            bits = chunk.view(np.uint32)
            chunk = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        yield start, chunk


def make_targets(n_rows, n_classes, seed):
    return np.random.default_rng(seed + 1).integers(0, n_classes, n_rows).astype(np.int32)


def make_logits(n_rows, n_classes, dtype, seed):
    storage = np.float32 if dtype == "float32" else np.uint16
    logits = np.empty((n_rows, n_classes), storage)
    for start, chunk in logits_chunks(n_rows, n_classes, dtype, seed):
        logits[start:start + len(chunk)] = chunk
    return logits


def reference_loss(n_rows, n_classes, dtype, seed):
    """Float64 mean cross-entropy of the benchmark inputs, computed chunk by chunk."""
    targets = make_targets(n_rows, n_classes, seed)
    total = 0.0
    for start, chunk in logits_chunks(n_rows, n_classes, dtype, seed):
        if dtype == "bfloat16":
            chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
        values = chunk.astype(np.float64)
        row_max = values.max(axis=1, keepdims=True)
        lse = row_max[:, 0] + np.log(np.exp(values - row_max).sum(axis=1))
        picked = values[np.arange(len(values)), targets[start:start + len(values)]]
        total += float((lse - picked).sum())
    return total / n_rows


# ----------------------------------------------------------------------------------------------
# Worker side (runs in a fresh subprocess per case)
# ----------------------------------------------------------------------------------------------

def _read_status_bytes():
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


class Case:
    """The forward and forward+backward callables of one implementation for one dtype."""

    def __init__(self, impl, dtype):
        self.impl = impl
        self.dtype = dtype
        self.loss_value = None
        if impl.framework == "torch":
            self._setup_torch()
        else:
            self._setup_mindspore()

    def _setup_torch(self):
        import torch
        import torch.nn.functional as F
        self._torch = torch

        def forward(logits, target):
            with torch.no_grad():
                return float(F.cross_entropy(logits, target))

        def forward_backward(logits, target):
            loss = F.cross_entropy(logits, target)
            (grad,) = torch.autograd.grad(loss, logits)
            return grad

        self.forward, self.forward_backward = forward, forward_backward
        self.sync = lambda: None

    def _setup_mindspore(self):
        import mindspore as ms
        from mindspore import nn
        from mindspore.common.api import _pynative_executor
        self._ms = ms
        ms.set_context(mode=ms.GRAPH_MODE if self.impl.mode == "graph" else ms.PYNATIVE_MODE)
        loss_cell = self._mindspore_loss_cell(ms, nn)

        class GradCell(nn.Cell):
            """Gradient of the loss w.r.t. the logits, compiled as one graph in GRAPH mode."""

            def __init__(self, net):
                super().__init__()
                self.grad_fn = ms.grad(net, grad_position=0)

            def construct(self, *inputs):
                return self.grad_fn(*inputs)

        grad_fn = GradCell(loss_cell) if self.impl.mode == "graph" else ms.grad(loss_cell, 0)
        self.forward = lambda *inputs: float(loss_cell(*inputs).asnumpy().reshape(-1)[0])
        self.forward_backward = grad_fn
        self.sync = _pynative_executor.sync

    def _mindspore_loss_cell(self, ms, nn):
        framework = self.impl.framework
        if framework in ("ms_xent", "ms_xent_loss"):
            from ms_xent.ops import cross_entropy_loss, cross_entropy_rows

            class RowsMean(nn.Cell):
                def construct(self, logits, target):
                    loss_rows, _, row_weight = cross_entropy_rows(logits, target)
                    return loss_rows.sum() / row_weight.sum()

            class PublicLoss(nn.Cell):
                def construct(self, logits, target):
                    return cross_entropy_loss(logits, target)[0]

            return RowsMean() if framework == "ms_xent" else PublicLoss()
        if framework == "ms_xent_composed":
            os.environ["MS_XENT_BACKEND"] = "composed"  # read when the graph compiles
            from ms_xent.nn import CrossEntropyLoss as MsXentCrossEntropyLoss
            return MsXentCrossEntropyLoss()
        if framework == "mindspore":
            return nn.CrossEntropyLoss()
        from mindformers.core import CrossEntropyLoss
        return CrossEntropyLoss()

    def inputs(self, logits_np, target_np):
        """Framework tensors sharing the numpy buffers (no extra copy of the logits)."""
        if self.impl.framework == "torch":
            torch = self._torch
            logits = torch.from_numpy(logits_np)
            if self.dtype == "bfloat16":
                logits = logits.view(torch.bfloat16)
            return (logits.requires_grad_(True), torch.from_numpy(target_np.astype(np.int64)))
        ms = self._ms
        logits = ms.from_numpy(logits_np)
        if self.dtype == "bfloat16":
            logits = logits.view(ms.bfloat16)
        inputs = (logits, ms.from_numpy(target_np))
        if self.impl.framework == "mindformers":
            inputs += (ms.from_numpy(np.ones(len(target_np), np.float32)),)
        return inputs

    def run_timed(self, function, inputs, warmup, repeats, probe=None):
        """(first call ms, [timed ms], [(read, copy) GB/s sampled right before each timed call]
        (empty without a probe)); every result is freed before the next call."""
        times, bandwidth = [], []
        for index in range(warmup + repeats):
            if probe is not None and index >= warmup:
                bandwidth.append(probe.sample())
            start = time.perf_counter()
            result = function(*inputs)
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
            if index == 0 and function is self.forward:
                self.loss_value = result
            del result
        return times[0], times[warmup:], bandwidth


def run_worker(spec_path):
    """Runs one case described by the JSON file ``spec_path``; writes the result JSON next to it."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result_path = Path(spec["result_path"])
    result = {"status": "failed"}
    phase = "import"
    try:
        impl = IMPLEMENTATIONS[spec["impl"]]
        case = Case(impl, spec["dtype"])
        phase = "tiny"
        tiny = case.inputs(make_logits(*TINY_SHAPE, spec["dtype"], spec["seed"]),
                           make_targets(*TINY_SHAPE, spec["seed"]))
        case.run_timed(case.forward, tiny, 0, 1)
        case.run_timed(case.forward_backward, tiny, 0, 1)
        del tiny
        phase = "bandwidth probe"
        probe = (BandwidthProbe(spec["probe"]["bytes"], spec["probe"]["read_method"],
                                spec["probe"]["copy_method"]) if spec.get("probe") else None)
        if probe is not None:
            probe.sample(1)  # touches the buffers before the baseline
        phase = "inputs"
        n_rows, n_classes = spec["shape"]
        inputs = case.inputs(make_logits(n_rows, n_classes, spec["dtype"], spec["seed"]),
                             make_targets(n_rows, n_classes, spec["seed"]))
        _reset_peak_rss()
        baseline = _read_status_bytes()["VmRSS"]
        phase = "forward"
        fwd_first, fwd_times, fwd_bandwidth = case.run_timed(case.forward, inputs, spec["warmup"],
                                                             spec["repeats"], probe)
        fwd_peak = _read_status_bytes()["VmHWM"]
        phase = "forward+backward"
        both_first, both_times, both_bandwidth = case.run_timed(
            case.forward_backward, inputs, spec["warmup"], spec["repeats"], probe)
        peak = _read_status_bytes()["VmHWM"]
        result = {"status": "ok", "fwd_ms": fwd_times, "fwd_bwd_ms": both_times,
                  "fwd_first_ms": fwd_first, "fwd_bwd_first_ms": both_first,
                  "fwd_bandwidth": fwd_bandwidth, "fwd_bwd_bandwidth": both_bandwidth,
                  "baseline_bytes": baseline, "fwd_extra_peak_bytes": fwd_peak - baseline,
                  "extra_peak_bytes": peak - baseline, "loss": case.loss_value}
    except Exception as error:  # pylint: disable=broad-except
        message = f"{type(error).__name__}: {error}"
        if OUT_OF_MEMORY_PATTERN.search(message):
            status = "out of memory"
        elif phase in ("import", "tiny") and UNSUPPORTED_PATTERN.search(message):
            status = "unsupported"
        else:
            status = "failed"
        result = {"status": status, "phase": phase, "message": message.strip()[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    result_path.write_text(json.dumps(result), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Parent side: machine, bandwidth, scheduling, guarding, reporting
# ----------------------------------------------------------------------------------------------

def meminfo_bytes(key):
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def process_rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine():
    cpu_model, flags = platform.processor() or "unknown", []
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
    isa = sorted(flag for flag in set(flags)
                 if flag.startswith(("avx", "amx")) or flag in ("fma", "f16c", "sse4_2"))
    caches = {}
    cache_root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(cache_root.glob("index*")):
        level = (index / "level").read_text().strip()
        kind = (index / "type").read_text().strip()
        if kind != "Instruction":
            caches[f"L{level}"] = (index / "size").read_text().strip()
    repo = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": cpu_model, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "isa": isa, "caches_per_core": caches,
        "memory_total_gib": meminfo_bytes("MemTotal") / GIB,
        "memory_available_gib": meminfo_bytes("MemAvailable") / GIB,
        "kernel": platform.release(), "python": platform.python_version(),
        "numpy": np.__version__, "mindspore": package_version("mindspore"),
        "mindformers": package_version("mindformers"), "torch": package_version("torch"),
        "ms_xent_git": git or "unknown", "load_average_start": os.getloadavg(),
    }


def _parallel_seconds(operation, arrays, threads):
    """Wall time of ``operation(*[a[part] for a in arrays])`` over ``threads`` parts in parallel."""
    bounds = np.linspace(0, len(arrays[0]), threads + 1).astype(int)
    workers = [threading.Thread(target=operation, args=[a[lo:hi] for a in arrays])
               for lo, hi in zip(bounds[:-1], bounds[1:])]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


# Ways to stream through memory from Python, each run on one part of the array per core in its own
# thread (numpy releases the GIL). The sum is compute-limited on this kind of VM (numpy's
# pairwise float32 sum: ~10 GB/s per core); an OR-reduction of 64-bit words or a max is a plain
# SIMD stream. The fastest method of each kind at the start of the run is the one used for the
# bound, in the parent and in every worker.
READ_METHODS = {
    "numpy bitwise_or.reduce (uint64)": lambda part: np.bitwise_or.reduce(part.view(np.uint64)),
    "numpy max": np.max,
    "numpy sum": np.sum,
}
COPY_METHODS = {"numpy copyto": np.copyto}


def _torch_seconds(torch, operation):
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def _torch_candidates(source, target, threads):
    """PyTorch's multi-threaded sum and copy on the same buffers, as a cross-check of numpy's
    methods (reported, not used for the bound: PyTorch's OpenMP threads keep spinning after a
    call, which would steal the cores from the call timed right after a sample)."""
    try:
        import torch
    except ImportError:
        return {}, {}
    torch.set_num_threads(threads)
    torch_source, torch_target = torch.from_numpy(source), torch.from_numpy(target)
    read = {"torch sum": lambda: _torch_seconds(torch, torch_source.sum)}
    copy = {"torch copy_": lambda: _torch_seconds(torch, lambda: torch_target.copy_(torch_source))}
    return read, copy


class BandwidthProbe:
    """Read and copy bandwidth in GB/s (1e9 B/s) over all usable cores, on float32 buffers far
    larger than the caches. ``sample()`` is the quick measurement taken right before each timed
    call; ``survey()`` tries every method and picks the fastest."""

    def __init__(self, size_bytes, read_method=None, copy_method=None):
        self.size_bytes = size_bytes
        self.threads = len(os.sched_getaffinity(0))
        self.source = np.ones(size_bytes // 4, np.float32)
        self.target = np.zeros_like(self.source)
        self.read_method = read_method or next(iter(READ_METHODS))
        self.copy_method = copy_method or next(iter(COPY_METHODS))

    def _read_seconds(self, method):
        return _parallel_seconds(READ_METHODS[method], [self.source], self.threads)

    def _copy_seconds(self, method):
        return _parallel_seconds(COPY_METHODS[method], [self.target, self.source], self.threads)

    def sample(self, repeats=2):
        """(read GB/s, copy GB/s), the better of ``repeats`` passes each (copy bytes = read +
        written = 2x the buffer)."""
        read = min(self._read_seconds(self.read_method) for _ in range(repeats))
        copy = min(self._copy_seconds(self.copy_method) for _ in range(repeats))
        return self.size_bytes / read / 1e9, 2 * self.size_bytes / copy / 1e9

    def survey(self, repeats=7):
        """Best GB/s of every method; selects the fastest numpy read and copy for ``sample``."""
        read = {name: lambda name=name: self._read_seconds(name) for name in READ_METHODS}
        copy = {name: lambda name=name: self._copy_seconds(name) for name in COPY_METHODS}
        torch_read, torch_copy = _torch_candidates(self.source, self.target, self.threads)
        read_gbs = {name: self.size_bytes / min(run() for _ in range(repeats)) / 1e9
                    for name, run in {**read, **torch_read}.items()}
        copy_gbs = {name: 2 * self.size_bytes / min(run() for _ in range(repeats)) / 1e9
                    for name, run in {**copy, **torch_copy}.items()}
        self.read_method = max(READ_METHODS, key=read_gbs.get)
        self.copy_method = max(COPY_METHODS, key=copy_gbs.get)
        return {"read_gbs": read_gbs[self.read_method], "copy_gbs": copy_gbs[self.copy_method],
                "read_method": self.read_method, "copy_method": self.copy_method,
                "read_methods_gbs": read_gbs, "copy_methods_gbs": copy_gbs,
                "threads": self.threads, "array_gib": self.size_bytes / GIB, "repeats": repeats}


def measure_bandwidth(size_bytes, repeats=7):
    """Best read and copy bandwidth over the methods of ``BandwidthProbe.survey``."""
    return BandwidthProbe(size_bytes).survey(repeats)


def combine_bandwidth(start, end):
    """The better of the surveys before and after the run (the fallback bound when a worker
    recorded no paired samples) and a description of the method."""
    read, copy = max(start["read_gbs"], end["read_gbs"]), max(start["copy_gbs"], end["copy_gbs"])
    others = ", ".join(f"{name} {value:.1f}" for name, value in
                       {**start["read_methods_gbs"], **start["copy_methods_gbs"]}.items())
    method = (f"{start['read_method']} (read) and {start['copy_method']} (copy) on "
              f"{start['array_gib']:.2f} GiB float32, {start['threads']} threads over equal "
              f"parts: the fastest at the start of the run (GB/s then: {others}); one sample "
              f"(better of 2 passes) right before every timed call gives that call's bound; "
              f"survey before / after the run: {start['read_gbs']:.1f} / {start['copy_gbs']:.1f},"
              f" {end['read_gbs']:.1f} / {end['copy_gbs']:.1f} GB/s")
    unstable = any(abs(start[key] - end[key]) > 0.25 * max(start[key], end[key])
                   for key in ("read_gbs", "copy_gbs"))
    return {"read_gbs": read, "copy_gbs": copy, "method": method, "unstable": unstable}


def bound_ms(n_rows, n_classes, dtype, bandwidth):
    """(forward, forward+backward) memory-traffic bound in ms; see the module docstring."""
    size = n_rows * n_classes * ITEMSIZE[dtype]
    forward = size / (bandwidth["read_gbs"] * 1e9)
    return forward * 1e3, (forward + 2 * size / (bandwidth["copy_gbs"] * 1e9)) * 1e3


def predicted_footprint_bytes(impl, n_rows, n_classes, dtype, probe_bytes):
    elements = n_rows * n_classes
    inputs = elements * ITEMSIZE[dtype]
    extra = impl.fp32_factor * elements * 4 + impl.native_factor * inputs
    return RUNTIME_OVERHEAD_BYTES + 2 * probe_bytes + inputs + extra


class Runner:
    """Launches and guards the worker subprocesses."""

    def __init__(self, args, output_dir, probe):
        self.args = args
        self.probe = probe  # bytes and methods of the workers' BandwidthProbe, or None
        self.work_dir = output_dir / "work"
        self.log_dir = output_dir / "logs"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1",
                        LOG_MF_PATH=str(self.work_dir / "mindformers_log"),
                        OM_MODULES_CACHE=str(self.work_dir / "om_modules"))

    def run(self, impl, shape, dtype, repeats, warmup, tag):
        """Runs one worker; returns its result dict (status "ok" or a failure record)."""
        name = f"{impl.name}_{shape[0]}x{shape[1]}_{dtype}_{tag}"
        spec_path = self.work_dir / f"{name}.json"
        result_path = self.work_dir / f"{name}.result.json"
        result_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({
            "impl": impl.name, "shape": list(shape), "dtype": dtype, "seed": self.args.seed,
            "repeats": repeats, "warmup": warmup, "result_path": str(result_path),
            "probe": self.probe}),
            encoding="utf-8")
        available = meminfo_bytes("MemAvailable")
        cap = available - self.args.mem_reserve_gb * GIB
        if self.args.mem_cap_gb:
            cap = min(cap, self.args.mem_cap_gb * GIB)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                cwd=self.work_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            killed_for = self._watch(process, cap)
        record = self._classify(process.returncode, killed_for, result_path, log_path, cap)
        record["log"] = str(log_path)
        return record

    def _watch(self, process, cap):
        """Polls the worker until it ends; kills it on timeout or memory pressure."""
        deadline = time.monotonic() + self.args.timeout
        while process.poll() is None:
            rss = process_rss_bytes(process.pid)
            reason = None
            if rss > cap:
                reason = f"RSS {rss / GIB:.2f} GiB exceeded the cap of {cap / GIB:.2f} GiB"
            elif meminfo_bytes("MemAvailable") < MACHINE_MEMORY_FLOOR_BYTES:
                reason = (f"machine available memory fell below "
                          f"{MACHINE_MEMORY_FLOOR_BYTES / GIB:.1f} GiB "
                          f"(worker RSS {rss / GIB:.1f} GiB)")
            elif time.monotonic() > deadline:
                reason = f"timeout after {self.args.timeout:.0f} s"
            if reason:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return reason
            time.sleep(WATCH_INTERVAL_S)
        return None

    @staticmethod
    def _classify(returncode, killed_for, result_path, log_path, cap):
        if killed_for:
            status = "timeout" if killed_for.startswith("timeout") else "out of memory"
            return {"status": status, "message": f"killed: {killed_for}"}
        if result_path.exists():
            return json.loads(result_path.read_text(encoding="utf-8"))
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        if returncode == -signal.SIGKILL:
            return {"status": "out of memory",
                    "message": f"SIGKILL from outside (likely the kernel OOM killer; cap "
                               f"{cap / GIB:.1f} GiB); log: {' | '.join(tail)}"}
        return {"status": "failed", "message": f"exit code {returncode}; log: {' | '.join(tail)}"}


@dataclasses.dataclass
class CaseResult:
    impl: str
    shape: tuple
    dtype: str
    status: str = "pending"
    message: str = ""
    fwd_ms: list = dataclasses.field(default_factory=list)
    fwd_bwd_ms: list = dataclasses.field(default_factory=list)
    fwd_first_ms: list = dataclasses.field(default_factory=list)
    fwd_bwd_first_ms: list = dataclasses.field(default_factory=list)
    extra_peak_bytes: list = dataclasses.field(default_factory=list)
    fwd_extra_peak_bytes: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)
    # Per round: each timed call's fraction of the bound at the bandwidth sampled right before it
    # (at the run's bandwidth when the worker took no samples).
    fwd_fraction: list = dataclasses.field(default_factory=list)
    fwd_bwd_fraction: list = dataclasses.field(default_factory=list)
    reference_loss: float = None
    logs: list = dataclasses.field(default_factory=list)

    def add(self, record, bandwidth):
        self.logs.append(record.get("log"))
        if record["status"] != "ok":
            self.status, self.message = record["status"], record.get("message", "")
            return
        self.status = "ok"
        for key in ("fwd_ms", "fwd_bwd_ms"):
            getattr(self, key).extend(record[key])
        for key, which in (("fwd", 0), ("fwd_bwd", 1)):
            samples = record[f"{key}_bandwidth"] or [None] * len(record[f"{key}_ms"])
            fractions = []
            for time_ms, sample in zip(record[f"{key}_ms"], samples):
                pair = bandwidth if sample is None else {"read_gbs": sample[0],
                                                         "copy_gbs": sample[1]}
                fractions.append(bound_ms(*self.shape, self.dtype, pair)[which] / time_ms)
            getattr(self, f"{key}_fraction").append(fractions)
        for key in ("fwd_first_ms", "fwd_bwd_first_ms", "extra_peak_bytes",
                    "fwd_extra_peak_bytes", "loss"):
            getattr(self, key).append(record[key])

    def median(self, key):
        values = getattr(self, key)
        return statistics.median(values) if self.status == "ok" and values else None

    def fraction(self, key):
        """(median over all timed calls, (lowest, highest) median of a round)."""
        rounds = getattr(self, f"{key}_fraction")
        if self.status != "ok" or not rounds:
            return None, None
        medians = [statistics.median(values) for values in rounds]
        overall = statistics.median(value for values in rounds for value in values)
        return overall, (min(medians), max(medians))

    def peak(self):
        return max(self.extra_peak_bytes) if self.status == "ok" else None

    def loss_error(self):
        if self.status != "ok" or self.reference_loss is None:
            return None
        worst = max(abs(value - self.reference_loss) for value in self.loss)
        return worst / abs(self.reference_loss)


def parse_shape(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x8080, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def split_list(values):
    return [item for value in values for item in value.split(",") if item]


def parse_args(argv):
    impl_help = "\n".join(f"  {impl.name:22s} {impl.label}" for impl in IMPLEMENTATIONS.values())
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nImplementations (--impls):\n" + impl_help,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="NxC",
                        help="logits shapes, space or comma separated "
                             f"(default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES),
                        help=f"float32 and/or bfloat16 (default: {' '.join(DEFAULT_DTYPES)})")
    parser.add_argument("--impls", nargs="+", default=["all"],
                        help="implementations to run, or 'all' (default; torch only if installed)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions per case, median reported (default: 5)")
    parser.add_argument("--reps-per-process", type=int, default=1,
                        help="timed repetitions per subprocess; rounds = repeats / this "
                             "(default: 1)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per subprocess before timing (default: 1)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per subprocess before it is killed (default: 900)")
    parser.add_argument("--mem-reserve-gb", type=float, default=2.0,
                        help="GiB of free memory left to the machine; cases predicted to need "
                             "more are skipped, workers above it are killed (default: 2)")
    parser.add_argument("--mem-cap-gb", type=float, default=None,
                        help="hard RSS cap per subprocess in GiB (default: free memory - reserve)")
    parser.add_argument("--force", action="store_true",
                        help="run cases even when their predicted footprint does not fit")
    parser.add_argument("--bandwidth", default=None, metavar="READ,COPY",
                        help="use these GB/s instead of measuring them (e.g. 25,32)")
    parser.add_argument("--bandwidth-array-gib", type=float, default=1.0,
                        help="array size of the bandwidth survey at the start and the end "
                             "(default: 1)")
    parser.add_argument("--probe-mib", type=float, default=256,
                        help="array size of the bandwidth sample taken before every timed call "
                             "(default: 256, far above the last-level cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: 0)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: ~/.cache/ms_xent/bench/<timestamp>")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.shapes = [parse_shape(shape) for shape in split_list(args.shapes)]
    args.dtypes = split_list(args.dtypes)
    for dtype in args.dtypes:
        if dtype not in ITEMSIZE:
            parser.error(f"--dtypes: expected float32 or bfloat16, got {dtype!r}")
    impls = split_list(args.impls)
    if impls == ["all"]:
        impls = [name for name in IMPLEMENTATIONS
                 if name != "torch" or package_version("torch") is not None]
    for name in impls:
        if name not in IMPLEMENTATIONS:
            parser.error(f"--impls: unknown {name!r}; expected 'all' or some of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    args.impls = [IMPLEMENTATIONS[name] for name in impls]
    if args.repeats < 1 or args.reps_per_process < 1 or args.warmup < 0:
        parser.error("--repeats and --reps-per-process must be >= 1, --warmup >= 0")
    return args


def run_benchmark(args, runner, bandwidth, progress):
    """Probe, then the interleaved rounds; returns the CaseResults in report order."""
    cases = {}
    for shape in args.shapes:
        for dtype in args.dtypes:
            for impl in args.impls:
                cases[impl.name, shape, dtype] = CaseResult(impl.name, shape, dtype)

    for dtype in args.dtypes:
        for impl in args.impls:
            progress.set_postfix_str(f"probe {impl.name} {dtype}")
            probe = runner.run(impl, PROBE_SHAPE, dtype, 1, 0, "probe")
            progress.update(1)
            if probe["status"] != "ok":
                progress.write(f"{impl.name} {dtype}: {probe['status']}: {probe.get('message')}")
                for shape in args.shapes:
                    cases[impl.name, shape, dtype].add(probe, bandwidth)

    rounds = math.ceil(args.repeats / args.reps_per_process)
    for shape in args.shapes:
        for dtype in args.dtypes:
            reference = reference_loss(*shape, dtype, args.seed)
            for impl in args.impls:
                cases[impl.name, shape, dtype].reference_loss = reference
            for round_index in range(rounds):
                done = round_index * args.reps_per_process
                repeats = min(args.reps_per_process, args.repeats - done)
                for impl in args.impls:
                    case = cases[impl.name, shape, dtype]
                    progress.set_postfix_str(f"{shape[0]}x{shape[1]} {dtype} {impl.name} "
                                             f"round {round_index + 1}/{rounds}")
                    if case.status in ("pending", "ok"):
                        _run_round(args, runner, bandwidth, case, impl, repeats, round_index,
                                   progress)
                    progress.update(1)
    return list(cases.values())


def _run_round(args, runner, bandwidth, case, impl, repeats, round_index, progress):
    probe_bytes = runner.probe["bytes"] if runner.probe else 0
    footprint = predicted_footprint_bytes(impl, *case.shape, case.dtype, probe_bytes)
    available = meminfo_bytes("MemAvailable") - args.mem_reserve_gb * GIB
    if footprint > available and not args.force:
        case.add({"status": "skipped",
                  "message": f"predicted footprint {footprint / GIB:.1f} GiB > "
                             f"{available / GIB:.1f} GiB free (minus reserve); --force runs it"},
                 bandwidth)
        progress.write(f"{impl.name} {case.shape} {case.dtype}: {case.message}")
        return
    record = runner.run(impl, case.shape, case.dtype, repeats, args.warmup, f"r{round_index}")
    case.add(record, bandwidth)
    if record["status"] != "ok":
        progress.write(f"{impl.name} {case.shape} {case.dtype}: {record['status']}: "
                       f"{record.get('message', '')[:300]}")


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def _fmt(value, digits=1):
    return "—" if value is None else f"{value:,.{digits}f}"


def _fraction(value):
    return "<0.01" if value < 0.01 else f"{value:.2f}"


def _fraction_with_spread(result, key):
    overall, (low, high) = result.fraction(key)
    return f"{_fraction(overall)} [{_fraction(low)}-{_fraction(high)}]"


def summary_lines(results):
    """One line per shape, dtype and mode of ms_xent's rows path: fwd+bwd time, fraction of the
    bound, extra peak, and the time of MindFormers' loss (same mode) and PyTorch over it."""
    lookup = {(r.impl, _case_key(r)): r for r in results}
    lines = []
    for shape, dtype in dict.fromkeys(_case_key(r) for r in results):
        for mode in ("graph", "pynative"):
            ours = lookup.get((f"ms_xent_{mode}", (shape, dtype)))
            if ours is None:
                continue
            head = f"- {shape[0]} x {shape[1]} {dtype} {mode.upper()}:"
            both = ours.median("fwd_bwd_ms")
            if both is None:
                lines.append(f"{head} {ours.status}")
                continue
            size = shape[0] * shape[1] * ITEMSIZE[dtype]
            parts = [f"fwd+bwd {both:,.1f} ms, {_fraction_with_spread(ours, 'fwd_bwd')} of the "
                     f"bound, extra peak {ours.peak() / size:.2f}x the logits"]
            graph = lookup.get(("ms_xent_graph", (shape, dtype)))
            if mode == "pynative" and graph and graph.median("fwd_bwd_ms"):
                parts.append(f"{both / graph.median('fwd_bwd_ms'):.2f}x GRAPH")
            for name, label in ((f"mindformers_{mode}", "MindFormers"), ("torch", "PyTorch")):
                other = lookup.get((name, (shape, dtype)))
                if other is None:
                    continue
                other_time = other.median("fwd_bwd_ms")
                parts.append(f"{label} takes {other_time / both:.1f}x as long" if other_time
                             else f"{label} {other.status}")
            lines.append(f"{head} {'; '.join(parts)}")
    return lines


def _case_key(result):
    return result.shape, result.dtype


def write_markdown(path, args, machine, bandwidth, results):
    impls = [impl.name for impl in args.impls]
    lines = ["# Cross-entropy benchmark", ""]
    load_start, load_end = machine["load_average_start"][0], machine["load_average_end"][0]
    cpus = machine["usable_cpus"]
    lines += [f"Command: `python scripts/bench.py {' '.join(args.argv)}`", "",
              f"Run: {machine['started']} to {machine['finished']}; load average at start "
              f"{load_start:.2f}, at end {load_end:.2f}.", ""]
    if load_start > 0.5 * cpus or bandwidth.get("unstable"):
        lines += ["**Warning: the machine was busy (load average at start "
                  f"{load_start:.1f} on {cpus} CPUs, or the "
                  "bandwidth before and after the run differs by more than 25%): times, bandwidth "
                  "and fractions of the bound are not representative.**", ""]
    lines += ["## Machine", "",
              f"- CPU: {machine['cpu']}, {cpus} usable of {machine['logical_cpus']} "
              f"logical CPUs; caches per core {machine['caches_per_core']}",
              f"- ISA: {' '.join(machine['isa'])}",
              f"- Memory: {machine['memory_total_gib']:.1f} GiB total, "
              f"{machine['memory_available_gib']:.1f} GiB available at start",
              f"- Software: Linux {machine['kernel']}, Python {machine['python']}, numpy "
              f"{machine['numpy']}, MindSpore {machine['mindspore']}, MindFormers "
              f"{machine['mindformers']}, PyTorch {machine['torch']}, "
              f"ms_xent {machine['ms_xent_git']}",
              f"- Memory bandwidth ({bandwidth['method']}): read {bandwidth['read_gbs']:.1f} GB/s, "
              f"copy {bandwidth['copy_gbs']:.1f} GB/s (read + write bytes)", "",
              "Memory-traffic bound, S = N * C * itemsize: forward S / read; forward+backward "
              "S / read + 2 S / copy. Fraction of the bound: for each timed call, its bound at "
              "the bandwidth sampled right before it divided by its time; the median over all "
              "timed calls, with the range of the rounds' medians in brackets. "
              f"Times: median of {args.repeats} timed calls after {args.warmup} warm-up call(s) "
              f"per subprocess, interleaved over {math.ceil(args.repeats / args.reps_per_process)} "
              "round(s). Extra peak = peak RSS over the inputs' baseline (max over rounds), in MiB "
              "and in multiples of the logits' size.", ""]
    lines += ["## Results", "",
              "| N x C | dtype | implementation | fwd ms | fwd+bwd ms | fraction of bound fwd / "
              f"fwd+bwd | extra peak MiB (x logits) | fwd+bwd time / {REFERENCE_IMPL} | "
              "loss rel. err | status |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by_case = {}
    for result in results:
        by_case.setdefault(_case_key(result), {})[result.impl] = result
    for (shape, dtype), row in by_case.items():
        size = shape[0] * shape[1] * ITEMSIZE[dtype]
        reference = row.get(REFERENCE_IMPL)
        reference_time = reference.median("fwd_bwd_ms") if reference else None
        for name in impls:
            result = row[name]
            fwd, both, peak = result.median("fwd_ms"), result.median("fwd_bwd_ms"), result.peak()
            fraction = (f"{_fraction(result.fraction('fwd')[0])} / "
                        f"{_fraction_with_spread(result, 'fwd_bwd')}" if fwd and both else "—")
            memory = (f"{peak / MIB:,.{0 if peak >= 10 * MIB else 1}f} ({peak / size:.2f}x)"
                      if peak is not None else "—")
            ratio = _fmt(both / reference_time, 2) if both and reference_time else "—"
            error = result.loss_error()
            status = result.status if result.status == "ok" else (
                f"**{result.status}**: {result.message.splitlines()[0][:160]}"
                .replace("|", "/"))
            lines.append(f"| {shape[0]} x {shape[1]} | {dtype} | {name} | {_fmt(fwd)} | "
                         f"{_fmt(both)} | {fraction} | {memory} | {ratio} | "
                         f"{'—' if error is None else f'{error:.1e}'} | {status} |")
    lines += ["", "## Summary", "", *summary_lines(results)]
    lines += ["", "## Bounds at the run's bandwidth survey", "",
              "| N x C | dtype | logits MiB | fwd bound ms | fwd+bwd bound ms |",
              "| --- | --- | ---: | ---: | ---: |"]
    for shape, dtype in by_case:
        bound_fwd, bound_both = bound_ms(*shape, dtype, bandwidth)
        lines.append(f"| {shape[0]} x {shape[1]} | {dtype} | "
                     f"{shape[0] * shape[1] * ITEMSIZE[dtype] / MIB:,.0f} | {bound_fwd:.1f} | "
                     f"{bound_both:.1f} |")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def write_chart(path, args, bandwidth, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    impls = [impl.name for impl in args.impls]
    cases = list(dict.fromkeys(_case_key(r) for r in results))
    lookup = {(r.impl, _case_key(r)): r for r in results}
    labels = [f"{s[0]}x{s[1]}\n{d}" for s, d in cases]
    panels = [("fwd+bwd time (ms, log)", lambda r, c: r.median("fwd_bwd_ms"), True),
              ("extra peak memory (MiB, log)", lambda r, c: r.peak() / MIB if r.peak() else None,
               True),
              ("fraction of the memory-traffic bound, fwd+bwd (log; 1 = memory speed)",
               lambda r, c: r.fraction("fwd_bwd")[0], True)]
    figure_width = min(22, max(10, 0.35 * len(cases) * len(impls)))
    figure, axes = plt.subplots(len(panels), 1, figsize=(figure_width, 13), squeeze=False)
    width = 0.8 / len(impls)
    colors = plt.get_cmap("tab10")
    for axis, (title, value_of, log_scale) in zip(axes[:, 0], panels):
        for index, name in enumerate(impls):
            xs, heights = [], []
            for position, case in enumerate(cases):
                result = lookup[name, case]
                x = position - 0.4 + width * (index + 0.5)
                value = value_of(result, case)
                if value is None:
                    axis.text(x, 0.02, result.status.split()[0], rotation=90, fontsize=7,
                              ha="center", va="bottom", transform=axis.get_xaxis_transform(),
                              color=colors(index))
                else:
                    xs.append(x)
                    heights.append(value)
            axis.bar(xs, heights, width, color=colors(index))
        if log_scale:
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        axis.set_title(title)
        axis.set_xticks(range(len(cases)), labels)
        axis.grid(axis="y", alpha=0.3)
    axes[-1, 0].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    handles = [Patch(color=colors(index), label=name) for index, name in enumerate(impls)]
    figure.legend(handles=handles, ncol=min(len(impls), 5), fontsize=9, loc="upper center",
                  bbox_to_anchor=(0.5, 0.97))
    figure.suptitle(f"Cross-entropy on CPU (read {bandwidth['read_gbs']:.1f} GB/s, "
                    f"copy {bandwidth['copy_gbs']:.1f} GB/s); no bar: status written instead")
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    from tqdm import tqdm
    args.argv = argv
    output_dir = args.output_dir or (Path.home() / ".cache" / "ms_xent" / "bench"
                                     / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    output_dir = output_dir.expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    machine["started"] = datetime.datetime.now().isoformat(timespec="seconds")
    if args.bandwidth:
        read, copy = (float(value) for value in args.bandwidth.split(","))
        bandwidth = {"read_gbs": read, "copy_gbs": copy, "method": "given with --bandwidth"}
    else:
        print("measuring memory bandwidth ...", file=sys.stderr)
        start = measure_bandwidth(int(args.bandwidth_array_gib * GIB))
        bandwidth = {"start": start, "read_gbs": start["read_gbs"], "copy_gbs": start["copy_gbs"]}
        probe = {"bytes": int(args.probe_mib * MIB), "read_method": start["read_method"],
                 "copy_method": start["copy_method"]}
        print(f"read {start['read_gbs']:.1f} GB/s ({start['read_method']}), copy "
              f"{start['copy_gbs']:.1f} GB/s ({start['copy_method']}); sampled again before "
              f"every timed call", file=sys.stderr)
    runner = Runner(args, output_dir, None if args.bandwidth else probe)
    rounds = math.ceil(args.repeats / args.reps_per_process)
    total = len(args.dtypes) * len(args.impls) * (1 + len(args.shapes) * rounds)
    with tqdm(total=total, unit="run", desc="bench", dynamic_ncols=True) as progress:
        results = run_benchmark(args, runner, bandwidth, progress)
    machine["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    machine["load_average_end"] = os.getloadavg()
    if not args.bandwidth:
        bandwidth["end"] = measure_bandwidth(int(args.bandwidth_array_gib * GIB))
        bandwidth.update(combine_bandwidth(bandwidth["start"], bandwidth["end"]))
    (output_dir / "results.json").write_text(json.dumps({
        "machine": machine, "bandwidth": bandwidth, "argv": argv,
        "results": [dataclasses.asdict(result) for result in results]}, indent=1),
        encoding="utf-8")
    write_markdown(output_dir / "results.md", args, machine, bandwidth, results)
    write_chart(output_dir / "results.png", args, bandwidth, results)
    print((output_dir / "results.md").read_text(encoding="utf-8"))
    print(f"results: {output_dir}/results.md, results.png, results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
