"""Memory and time of the fused linear + cross-entropy against the unfused paths (CPU).

For each shape N x H x V and dtype, the forward+backward (gradients w.r.t. hidden [N, H] and the
lm_head weight [V, H], "mean" loss) of

* ``fused``: ``ms_xent.ops.linear_cross_entropy`` (automatic chunk size; ``--chunk-sizes`` adds
  fixed ones, e.g. ``auto,64``);
* ``unfused``: logits = hidden @ weight.T (``ops.MatMul(transpose_b=True)``; for bfloat16 in
  float32, cast to bfloat16: MindSpore has no bfloat16 matmul on CPU) + ``ms_xent.nn``'s
  ``CrossEntropyLoss``;
* ``mindformers``: the same logits + ``mindformers.core.CrossEntropyLoss`` (input_mask of ones).

Modes (``--modes``, default ``graph,pynative``): ``graph`` (GRAPH_MODE, how MindFormers trains),
``pynative``, and ``pynative_blocking`` (PYNATIVE with ``mindspore.runtime.launch_blocking()``).
The last one exists because in plain PYNATIVE MindSpore 2.9's Python thread busy-waits on a core
while a kernel runs: on a 2-core machine that takes about a third of the CPU from multi-threaded
kernels (measured here: the fused CPU kernel 8.6 s blocking vs 16.4 s plain at 8192 x 1024 x
32000 float32).

Method: one fresh subprocess per (implementation, shape, dtype, mode). It imports its framework,
runs the implementation on a tiny input (loads kernels, starts thread pools), creates the inputs
(hidden ~ N(0, 1), weight ~ N(0, 1/H) * 3, uniform targets; seeded, identical for every
implementation), compiles the GRAPH-mode cell for them (``Cell.compile``: once per shape, not per
step; its memory is MindSpore's compiler's), resets the peak-RSS counter
(``/proc/self/clear_refs`` = 5: VmHWM restarts at the current RSS), takes the current RSS as the
baseline, runs the forward+backward once and reads VmHWM: peak extra memory = VmHWM - baseline,
everything the loss and its gradients needed on top of the inputs (including the gradients
themselves and memory kept by MindSpore's pools). Then ``--repeats`` timed calls (after the
first, untimed one): the time is their median; each call ends with a full synchronisation and
frees its result.

``--rounds`` > 1 runs the whole list of cases that many times, one round after the other, so that
the implementations alternate (interleaved A/B runs on a machine whose load and memory bandwidth
drift); the table then gives per case the median over the rounds, and the time ratio to
``unfused`` is the median of the per-round ratios. Every case records the load average (1 min)
at its start.

Targets: peak extra memory <= 5% of the logits' size (N * V * itemsize) + the weight
gradient (V * H * 4, float32 accumulation), time <= 1.3 x ``unfused``.

Safety: a subprocess whose RSS exceeds ``--mem-cap-gb`` (default: the available memory at launch
minus 3 GiB, so that other processes on a shared machine keep room) is killed and recorded as out
of memory; one that exceeds ``--timeout`` or fails is recorded as such. Nothing is written to the
current directory: results (``results.md``, ``results.json``, ``logs/``) go to ``--output-dir``
(default ``~/.cache/ms_xent/bench_linear_ce/<timestamp>``).

Example::

    python scripts/bench_linear_cross_entropy.py                       # the 4 reference cases
    python scripts/bench_linear_cross_entropy.py --shapes 1024x256x8000 --repeats 3
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

DEFAULT_SHAPES = ("8192x1024x32000", "4096x1024x128256")
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_IMPLS = ("fused", "unfused", "mindformers")
MODES = ("graph", "pynative", "pynative_blocking")
ITEMSIZE = {"float32": 4, "bfloat16": 2}
GIB = 1 << 30
MIB = 1 << 20
WATCH_INTERVAL_S = 0.05
TINY = (8, 16, 64)


def _status_bytes(pid="self"):
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _ = line.split()
                values[key[:-1]] = int(amount) * 1024
    return values


def _available_bytes():
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


# ---- worker (runs in the subprocess) -------------------------------------------------------

def _make_loss(impl, chunk_size, ms, ops):
    """A function (hidden, weight, target) -> scalar loss for ``impl``."""
    matmul = ops.MatMul(transpose_b=True)

    def logits_of(hidden, weight):
        if hidden.dtype == ms.float32:
            return matmul(hidden, weight)
        return matmul(hidden.astype(ms.float32), weight.astype(ms.float32)).astype(hidden.dtype)

    if impl == "fused":
        from ms_xent.ops.linear_cross_entropy import linear_cross_entropy

        def loss(hidden, weight, target):
            return linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size)
        return loss
    if impl == "unfused":
        from ms_xent.nn.cross_entropy_loss import CrossEntropyLoss
        cell = CrossEntropyLoss()
    else:
        from mindformers.core import CrossEntropyLoss as MindFormersCrossEntropyLoss
        cell = MindFormersCrossEntropyLoss()

    def loss(hidden, weight, target):
        mask = ops.ones(target.shape, ms.float32)
        return cell(logits_of(hidden, weight), target, mask).sum()
    return loss


def run_worker(spec):
    """Measures one case; returns a dict for results.json."""
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.graph.api import _pynative_executor

    ms.set_context(mode=ms.GRAPH_MODE if spec["mode"] == "graph" else ms.PYNATIVE_MODE)
    if spec["mode"] == "pynative_blocking":
        ms.runtime.launch_blocking()
    dtype = {"float32": ms.float32, "bfloat16": ms.bfloat16}[spec["dtype"]]
    loss = _make_loss(spec["impl"], spec["chunk_size"], ms, ops)

    class Gradients(nn.Cell):
        def construct(self, hidden, weight, target):
            return ms.value_and_grad(loss, grad_position=(0, 1))(hidden, weight, target)

    gradients = Gradients() if spec["mode"] == "graph" else ms.value_and_grad(
        loss, grad_position=(0, 1))

    def inputs(n_rows, n_hidden, n_vocab):
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((n_rows, n_hidden), dtype=np.float32)
        weight = rng.standard_normal((n_vocab, n_hidden), dtype=np.float32)
        weight *= 3.0 / np.sqrt(n_hidden)
        target = rng.integers(0, n_vocab, n_rows).astype(np.int32)
        return (ms.Tensor(hidden).astype(dtype), ms.Tensor(weight).astype(dtype),
                ms.Tensor(target))

    def call(args):
        value, grads = gradients(*args)
        _pynative_executor.sync()
        result = float(value.astype(ms.float32).asnumpy())
        del grads
        return result

    call(inputs(*TINY))
    args = inputs(spec["rows"], spec["hidden"], spec["vocab"])
    if spec["mode"] == "graph":
        gradients.compile(*args)
    _pynative_executor.sync()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    baseline = _status_bytes()["VmRSS"]
    start = time.perf_counter()
    loss_value = call(args)
    first_call = time.perf_counter() - start
    peak_extra = _status_bytes()["VmHWM"] - baseline
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        call(args)
        times.append(time.perf_counter() - start)
    return {"status": "ok", "loss": loss_value, "peak_extra_bytes": peak_extra,
            "first_call_s": first_call, "times_s": times, "median_s": statistics.median(times)}


# ---- driver ---------------------------------------------------------------------------------

def launch(spec, work_dir, log_path, mem_cap, timeout):
    """Runs one worker subprocess while watching its RSS; returns its result dict."""
    spec_path = work_dir / f"{spec['name']}.json"
    result_path = work_dir / f"{spec['name']}.result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, GLOG_v="3", LOG_MF_PATH=str(work_dir / "mindformers_log"),
               OM_MODULES_CACHE=str(work_dir / "modules"), MS_OM_PATH=str(work_dir / "om"))
    command = [sys.executable, os.path.abspath(__file__), "--worker", str(spec_path),
               "--worker-result", str(result_path)]
    peak_rss = 0
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=work_dir, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        start = time.monotonic()
        status = None
        while process.poll() is None:
            try:
                rss = _status_bytes(process.pid)["VmRSS"]
            except (FileNotFoundError, KeyError, ProcessLookupError):
                rss = 0
            peak_rss = max(peak_rss, rss)
            if rss > mem_cap:
                status = f"out of memory (RSS > cap {mem_cap / GIB:.1f} GiB, killed)"
            elif time.monotonic() - start > timeout:
                status = f"timeout after {timeout:.0f} s"
            if status:
                process.kill()
                process.wait()
                break
            time.sleep(WATCH_INTERVAL_S)
    if status is None and result_path.exists():
        return json.loads(result_path.read_text(encoding="utf-8"))
    if status is None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        status = f"failed (exit {process.returncode}): {' | '.join(tail)[:300]}"
    return {"status": status, "watched_peak_rss_bytes": peak_rss}


def _mib(value):
    return f"{value / MIB:,.0f}"


def markdown(results, header):
    """One line per case: medians over the rounds that succeeded (memory, time, load) and the
    median of the per-round time ratios to ``unfused``."""
    lines = [header, "",
             "| N x H x V | dtype | mode | implementation | peak extra MiB | % of logits | "
             "target MiB | memory vs target | median s (first call) | time vs unfused | "
             "load | rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    unfused_time = {}
    for result in results:
        if result["impl"] == "unfused" and result["status"] == "ok":
            key = (result["shape"], result["dtype"], result["mode"], result["round"])
            unfused_time[key] = result["median_s"]
    cases = {}
    for result in results:
        key = (result["shape"], result["dtype"], result["mode"], result["label"])
        cases.setdefault(key, []).append(result)
    for (shape, dtype, mode, label), runs in cases.items():
        rows, hidden, vocab = runs[0]["dims"]
        logits = rows * vocab * ITEMSIZE[dtype]
        target = 0.05 * logits + vocab * hidden * 4
        cells = [shape, dtype, mode, label]
        done = [run for run in runs if run["status"] == "ok"]
        if not done:
            lines.append("| " + " | ".join(cells + [runs[0]["status"]] + [""] * 7) + " |")
            continue
        extra = statistics.median(run["peak_extra_bytes"] for run in done)
        ratios = [run["median_s"] / unfused_time[(shape, dtype, mode, run["round"])]
                  for run in done if (shape, dtype, mode, run["round"]) in unfused_time]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "n/a"
        median_s = statistics.median(run["median_s"] for run in done)
        first_s = statistics.median(run["first_call_s"] for run in done)
        cells += [_mib(extra), f"{100 * extra / logits:.1f}%", _mib(target),
                  f"{extra / target:.2f}x", f"{median_s:.2f} ({first_s:.1f})", ratio,
                  f"{statistics.median(run['load'] for run in done):.1f}",
                  f"{len(done)}/{len(runs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help="comma-separated NxHxV (default: %(default)s)")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    parser.add_argument("--modes", default="graph,pynative",
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--chunk-sizes", default="auto",
                        help="fused chunk sizes in rows, 'auto' = automatic (default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of the whole case list, alternating the implementations")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    parser.add_argument("--mem-cap-gb", type=float, default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker).read_text(encoding="utf-8"))
        try:
            result = run_worker(spec)
        except Exception as error:  # pylint: disable=broad-except
            traceback.print_exc()
            result = {"status": f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"}
        Path(args.worker_result).write_text(json.dumps(result), encoding="utf-8")
        return 0

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output_dir or Path.home() / ".cache/ms_xent/bench_linear_ce" / stamp)
    work_dir, log_dir = output / "work", output / "logs"
    work_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    mem_cap = args.mem_cap_gb * GIB if args.mem_cap_gb else _available_bytes() - 3 * GIB
    load = os.getloadavg()[0]
    busy = (" (above half the cores: other processes were running, times are indicative)"
            if load > os.cpu_count() / 2 else "")
    header = (f"Fused linear + cross-entropy, forward+backward (grad hidden and weight), CPU "
              f"({os.cpu_count()} cores), {datetime.datetime.now():%Y-%m-%d %H:%M}. Load average "
              f"at start {load:.1f}{busy}. Memory cap per subprocess {mem_cap / GIB:.1f} GiB; "
              f"median of {args.repeats} timed calls after one untimed call; {args.rounds} round(s).")
    print(header, flush=True)

    unknown_modes = set(args.modes.split(",")) - set(MODES)
    if unknown_modes:
        parser.error(f"--modes: unknown {sorted(unknown_modes)}; choose from {MODES}")
    specs = []
    for shape in args.shapes.split(","):
        rows, hidden, vocab = (int(part) for part in shape.split("x"))
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                for impl in args.impls.split(","):
                    chunk_sizes = args.chunk_sizes.split(",") if impl == "fused" else ["auto"]
                    for chunk in chunk_sizes:
                        label = impl if impl != "fused" else f"fused (chunk {chunk})"
                        name = f"{impl}-{chunk}-{shape}-{dtype}-{mode}"
                        specs.append({"name": name, "impl": impl, "label": label, "shape": shape,
                                      "rows": rows, "hidden": hidden, "vocab": vocab,
                                      "dtype": dtype, "mode": mode, "repeats": args.repeats,
                                      "chunk_size": None if chunk == "auto" else int(chunk)})
    results = []
    for round_index in range(args.rounds):
        for index, spec in enumerate(specs, 1):
            load = os.getloadavg()[0]
            print(f"[round {round_index + 1}/{args.rounds}, {index}/{len(specs)}] {spec['name']} "
                  f"(load {load:.1f}) ...", flush=True)
            result = launch(spec, work_dir, log_dir / f"{spec['name']}-{round_index}.log",
                            mem_cap, args.timeout)
            result.update({key: spec[key] for key in ("impl", "label", "shape", "dtype", "mode")})
            result.update(dims=(spec["rows"], spec["hidden"], spec["vocab"]), round=round_index,
                          load=load)
            results.append(result)
            summary = (f"peak extra {_mib(result['peak_extra_bytes'])} MiB, median "
                       f"{result['median_s']:.2f} s" if result["status"] == "ok"
                       else result["status"])
            print(f"    {summary}", flush=True)
            (output / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    table = markdown(results, header)
    (output / "results.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
