"""Kernel-only timing of the fused cross-entropy CPU kernels, without MindSpore.

For A/B tests of kernel changes: calls the exported ``XentHardForward`` and ``XentHardBackward``
of the kernel library (or of a library given with ``--library``, e.g. a build of another
revision) through their C ABI with ctypes, on numpy buffers allocated once, and prints per shape
and dtype the median forward and backward times, the memory traffic they reach (forward: reads
S = N * C * itemsize bytes; backward: reads S and writes S) and the fraction of the
memory-traffic bound, with the bandwidth measured as ``scripts/bench.py`` does.

``--cold`` rewrites a 1 GiB buffer before every timed call, so that the logits do not start in
the (here very large, shared) last-level cache: closer to a training step, where other tensors
pass through the cache between the loss's forward and backward.

Example::

    python scripts/bench_kernels.py --shapes 4096x8080 8192x32000 --dtypes float32 bfloat16
    python scripts/bench_kernels.py --library /tmp/old/libms_xent_kernels.so --repeats 11
"""

import argparse
import ctypes
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

from bench import ITEMSIZE, bound_ms, measure_bandwidth, parse_shape

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


def median_ms(call, repeats, flush):
    call()
    times = []
    for _ in range(repeats):
        if flush is not None:
            np.add(flush, 1, out=flush)
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(library, n_rows, n_classes, dtype, repeats, flush):
    logits, target = make_inputs(n_rows, n_classes, dtype)
    rows = [np.zeros(n_rows, np.float32) for _ in range(3)]  # loss, lse, row weight
    weight = np.ones(n_classes, np.float32)
    grad = np.zeros_like(logits)
    row_grad = np.full(n_rows, 1.0 / n_rows, np.float32)
    row_grad_lse = np.zeros(n_rows, np.float32)
    forward = KernelCall(library.XentHardForward, [logits, target, weight] + rows,
                         [dtype, "int64"] + ["float32"] * 4)
    backward = KernelCall(library.XentHardBackward,
                          [logits, target, weight, rows[1], row_grad, row_grad_lse, grad],
                          [dtype, "int64"] + ["float32"] * 4 + [dtype])
    return median_ms(forward, repeats, flush), median_ms(backward, repeats, flush)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), type=parse_shape)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=sorted(ITEMSIZE))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls (median)")
    parser.add_argument("--library", default=None, help="kernel library (default: this checkout)")
    parser.add_argument("--cold", action="store_true",
                        help="rewrite a 1 GiB buffer before each timed call")
    parser.add_argument("--bandwidth", default=None, metavar="READ,COPY",
                        help="use these GB/s instead of measuring them (e.g. 25,32)")
    args = parser.parse_args()
    library = ctypes.CDLL(args.library or kernel_library())
    if args.bandwidth:
        read, copy = (float(value) for value in args.bandwidth.split(","))
        bandwidth = {"read_gbs": read, "copy_gbs": copy}
    else:
        bandwidth = measure_bandwidth(1 << 30)
    print(f"library: {args.library or kernel_library()}\nbandwidth: read "
          f"{bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s\n")
    print("| N x C | dtype | fwd ms (GB/s) | bwd ms (GB/s) | fwd+bwd ms | bound ms | fraction |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    flush = np.ones(1 << 28, np.float32) if args.cold else None
    for dtype in args.dtypes:
        for n_rows, n_classes in args.shapes:
            forward, backward = run_case(library, n_rows, n_classes, dtype, args.repeats, flush)
            size = n_rows * n_classes * ITEMSIZE[dtype]
            _, bound = bound_ms(n_rows, n_classes, dtype, bandwidth)
            total = forward + backward
            read_gbs, traffic_gbs = size / forward / 1e6, 2 * size / backward / 1e6
            print(f"| {n_rows} x {n_classes} | {dtype} | {forward:.3g} ({read_gbs:.1f}) | "
                  f"{backward:.3g} ({traffic_gbs:.1f}) | {total:.3g} | {bound:.3g} | "
                  f"{bound / total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
