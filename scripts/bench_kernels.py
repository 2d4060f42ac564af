"""Kernel-only timing of the fused cross-entropy CPU kernels, without MindSpore.

For A/B tests of kernel changes: calls the exported ``XentHardForward`` and ``XentHardBackward``
of the kernel library (or of a library given with ``--library``, e.g. a build of another
revision) through their C ABI with ctypes, on numpy buffers allocated once, and prints per shape
and dtype the median forward and backward times, the memory traffic they reach (forward: reads
S = N * C * itemsize bytes; backward: reads S and writes S) and the fraction of the
memory-traffic bound, with the bandwidth sampled right before each call as ``scripts/bench.py``
does (median over the calls). Several ``--library`` take turns call by call: an interleaved A/B
test that a change of load hits alike.

``--cold`` rewrites a 1 GiB buffer before every timed call, so that the logits do not start in
the (here very large, shared) last-level cache: closer to a training step, where other tensors
pass through the cache between the loss's forward and backward.

Example::

    python scripts/bench_kernels.py --shapes 4096x8080 8192x32000 --dtypes float32 bfloat16
    python scripts/bench_kernels.py --library /tmp/old/libms_xent_kernels.so new.so --repeats 11
"""

import argparse
import ctypes
import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np

from bench import ITEMSIZE, BandwidthProbe, parse_shape

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ("4096x8080", "8192x32000", "2048x128256", "4096x151936")


def kernel_library():
    """Path of the kernel library of the ms_xent that Python finds (an installed one, else this
    checkout's): its ms_xent/_backends/cpu/build.py loaded by path, since importing the ms_xent
    package would import MindSpore."""
    package = importlib.util.find_spec("ms_xent")
    package_dir = Path(package.submodule_search_locations[0]) if package else REPO / "ms_xent"
    spec = importlib.util.spec_from_file_location("ms_xent_kernel_build",
                                                  package_dir / "_backends" / "cpu" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel_library()


class KernelCall:
    """One kernel with its arguments marshalled once: ``int Fn(int nparam, void **params,
    int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra)``; default
    attributes (no AotExtra)."""

    def __init__(self, function, arrays, dtypes):
        count = len(arrays)
        self.function = function
        self.arrays = arrays
        self.params = (ctypes.c_void_p * count)(*[array.ctypes.data for array in arrays])
        self.ndims = (ctypes.c_int * count)(*[array.ndim for array in arrays])
        self.shape_arrays = [(ctypes.c_int64 * array.ndim)(*array.shape) for array in arrays]
        self.shapes = (ctypes.POINTER(ctypes.c_int64) * count)(
            *[ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64)) for shape in self.shape_arrays])
        self.names = [dtype.encode() for dtype in dtypes]
        self.dtypes = (ctypes.c_char_p * count)(*self.names)

    def __call__(self):
        status = self.function(len(self.arrays), self.params, self.ndims, self.shapes, self.dtypes,
                               None, None)
        if status != 0:
            raise RuntimeError(f"kernel returned {status}")


def make_inputs(n_rows, n_classes, dtype, seed=0):
    """Logits ~ N(0, 3^2) (bfloat16 as uint16 bit patterns, float32 truncated) and targets."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n_rows, n_classes), dtype=np.float32) * 3
    if dtype == "bfloat16":
        logits = (logits.view(np.uint32) >> 16).astype(np.uint16)
    return logits, rng.integers(0, n_classes, n_rows).astype(np.int64)


def kernel_calls(library, logits, target):
    """The forward and backward of one library on the same buffers."""
    n_rows, n_classes = logits.shape
    dtype = "float32" if logits.dtype == np.float32 else "bfloat16"
    # loss_rows, lse, row_weight, row_max, row_log_sum
    rows = [np.zeros(n_rows, np.float32) for _ in range(5)]
    weight = np.ones(n_classes, np.float32)
    grad = np.zeros_like(logits)
    row_grad = np.full(n_rows, 1.0 / n_rows, np.float32)
    row_grad_lse = np.zeros(n_rows, np.float32)
    forward = KernelCall(library.XentHardForward, [logits, target, weight] + rows,
                         [dtype, "int64"] + ["float32"] * 6)
    backward = KernelCall(library.XentHardBackward,
                          [logits, target, weight, rows[3], rows[4], row_grad, row_grad_lse, grad],
                          [dtype, "int64"] + ["float32"] * 5 + [dtype])
    return forward, backward


def run_case(libraries, n_rows, n_classes, dtype, repeats, flush, probe, bandwidth):
    """Per library: (forward ms, backward ms, fraction of the fwd+bwd bound), medians over
    ``repeats`` rounds in which the libraries take turns; each call's bound uses the bandwidth
    sampled right before it (``probe``), or the given ``bandwidth``."""
    logits, target = make_inputs(n_rows, n_classes, dtype)
    calls = [kernel_calls(library, logits, target) for library in libraries]
    for forward, backward in calls:
        forward()
        backward()
    size = n_rows * n_classes * ITEMSIZE[dtype]
    times = [([], [], []) for _ in libraries]
    for _ in range(repeats):
        for (forward, backward), (fwd_ms, bwd_ms, fractions) in zip(calls, times):
            elapsed, bounds = [], 0.0
            for call, bytes_per_gbs in ((forward, (size, 0)), (backward, (0, 2 * size))):
                if flush is not None:
                    np.add(flush, 1, out=flush)
                read, copy = probe.sample() if probe else (bandwidth["read_gbs"],
                                                           bandwidth["copy_gbs"])
                bounds += (bytes_per_gbs[0] / read + bytes_per_gbs[1] / copy) / 1e6
                start = time.perf_counter()
                call()
                elapsed.append((time.perf_counter() - start) * 1e3)
            fwd_ms.append(elapsed[0])
            bwd_ms.append(elapsed[1])
            fractions.append(bounds / (elapsed[0] + elapsed[1]))
    return [tuple(statistics.median(values) for values in per_library) for per_library in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), type=parse_shape)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=sorted(ITEMSIZE))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls (median)")
    parser.add_argument("--library", nargs="+", default=None,
                        help="kernel libraries (default: this checkout's); several take turns "
                             "call by call (interleaved A/B)")
    parser.add_argument("--cold", action="store_true",
                        help="rewrite a 1 GiB buffer before each timed call")
    parser.add_argument("--bandwidth", default=None, metavar="READ,COPY",
                        help="use these GB/s instead of measuring them (e.g. 25,32)")
    args = parser.parse_args()
    paths = args.library or [kernel_library()]
    libraries = [ctypes.CDLL(path) for path in paths]
    probe = None
    if args.bandwidth:
        read, copy = (float(value) for value in args.bandwidth.split(","))
        bandwidth = {"read_gbs": read, "copy_gbs": copy}
    else:
        probe = BandwidthProbe(256 << 20)
        bandwidth = probe.survey()
    for index, path in enumerate(paths):
        print(f"library {index}: {path}")
    print(f"bandwidth at the start: read {bandwidth['read_gbs']:.1f} GB/s, copy "
          f"{bandwidth['copy_gbs']:.1f} GB/s; each call's bound uses a sample taken right "
          f"before it" if probe else "")
    print(f"load average: {os.getloadavg()[0]:.2f}\n")
    print("| N x C | dtype | library | fwd ms (GB/s) | bwd ms (GB/s) | fwd+bwd ms | fraction |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    flush = np.ones(1 << 28, np.float32) if args.cold else None
    for dtype in args.dtypes:
        for n_rows, n_classes in args.shapes:
            results = run_case(libraries, n_rows, n_classes, dtype, args.repeats, flush, probe,
                               bandwidth)
            size = n_rows * n_classes * ITEMSIZE[dtype]
            for index, (forward, backward, fraction) in enumerate(results):
                read_gbs, traffic_gbs = size / forward / 1e6, 2 * size / backward / 1e6
                print(f"| {n_rows} x {n_classes} | {dtype} | {index} | {forward:.3g} "
                      f"({read_gbs:.1f}) | {backward:.3g} ({traffic_gbs:.1f}) | "
                      f"{forward + backward:.3g} | {fraction:.2g} |", flush=True)
    print(f"\nload average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
