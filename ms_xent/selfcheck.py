"""Self-check of every ms_xent route available on this device: ``python -m ms_xent.selfcheck``.

Each route (on CPU: the C++ kernels ``cpu``, ``composed`` and ``ascend_emulated``, the Ascend
route with the vendor operators replaced by their CPU emulator; on Ascend: the vendor built-in
primitive, the vendor operator through ``ops.Custom(func="aclnnXxx")`` and ``composed``) runs the
public API (``cross_entropy_loss``, ``cross_entropy_rows``, the ``CrossEntropyLoss`` Cell,
``binary_cross_entropy_with_logits``, ``linear_cross_entropy``) over dtypes and options, forward
and gradient, against the composed route in float32 on the same (rounded) inputs. It prints a
pass / fail table with the time and peak memory of each case (device memory on Ascend, the
process's peak resident set on CPU; timings on a shared machine are indicative only) and writes
it as Markdown with ``--markdown PATH``. The exit status is 1 when a case fails.
"""

import argparse
import os
import sys
import threading
import time

import numpy as np
import mindspore as ms

import ms_xent
from ms_xent.ops import (binary_cross_entropy_with_logits, cross_entropy_loss, cross_entropy_rows,
                         linear_cross_entropy)

# Accepted max |difference| / max |reference| against the float32 reference, per input dtype.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
CROSS_ENTROPY_OPTIONS = {
    "mean": {"reduction": "mean"},
    "sum, ignore_index": {"reduction": "sum", "ignore_index": 3},
    "none": {"reduction": "none"},
    "label_smoothing 0.1": {"reduction": "mean", "label_smoothing": 0.1},
    "z-loss 1e-3": {"reduction": "mean", "lse_square_scale_for_zloss": 1e-3},
    "class weights": {"reduction": "mean", "weighted": True},
}
REFERENCE = "composed"


def routes():
    """[(route name, backend request, MS_XENT_ASCEND_BACKEND value or None)] for this device."""
    device = ms.get_context("device_target")
    if device == "Ascend":
        return [("ascend builtin (vendor)", "ascend", "builtin"),
                ("ascend aclnn Custom (vendor)", "ascend", "aclnn_custom"),
                ("composed", "composed", None)]
    if device == "CPU":
        return [("cpu kernels", "cpu", None), ("composed", "composed", None),
                ("ascend_emulated (vendor EMULATED on CPU)", "ascend_emulated", None)]
    return [("composed", "composed", None)]


class PeakMemory:
    """Peak memory while the block runs, in MiB above its start: device memory on Ascend
    (``ms.runtime.max_memory_allocated``), else the resident set sampled every millisecond (the
    process's own peak, VmHWM, cannot be reset in every container)."""

    def __init__(self):
        self.on_device = ms.get_context("device_target") == "Ascend"
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _resident():
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._resident())

    def __enter__(self):
        if self.on_device:
            ms.runtime.reset_peak_memory_stats()
            self.start = ms.runtime.memory_allocated()
        elif os.path.exists("/proc/self/statm"):
            self.start = self.peak = self._resident()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.on_device:
            self.peak = ms.runtime.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._resident())

    @property
    def mib(self):
        if not self.on_device and self._thread is None:
            return float("nan")
        return (self.peak - self.start) / 2**20


def _case_inputs(seed, n_rows=64, n_classes=512):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n_classes)) * 3).astype(np.float32)
    target = rng.integers(0, n_classes, n_rows).astype(np.int64)
    target[::7] = 3  # rows for ignore_index 3
    target[1::11] = -100  # rows for the default ignore_index
    weight = rng.uniform(0.1, 1.0, n_classes).astype(np.float32)
    return x, target, weight


def _cross_entropy(x, target, weight, options):
    options = dict(options)
    weighted = options.pop("weighted", False)
    if "ignore_index" in options:
        # The rows marked with the default ignore_index are ignored rows under this one too (a
        # value outside [0, C) that is not ignore_index is refused).
        target = ms.ops.select(target == -100, ms.ops.full_like(target, options["ignore_index"]),
                               target)

    def loss_of(logits):
        outputs = cross_entropy_loss(logits, target, weight if weighted else None, **options)
        total = outputs[0].astype(ms.float32).sum()
        if options.get("lse_square_scale_for_zloss", 0.0) > 0:
            total = total + outputs[3].sum()
        return total
    loss, grad = ms.value_and_grad(loss_of)(x)
    return [loss, grad]


def _rows(x, target, weight, options):  # pylint: disable=unused-argument
    def loss_of(logits):
        loss_rows, lse, _ = cross_entropy_rows(logits, target,
                                               label_smoothing=options.get("label_smoothing", 0.0))
        return loss_rows.sum() + 1e-3 * (lse * lse).sum()
    loss, grad = ms.value_and_grad(loss_of)(x)
    return [loss, grad]


def _cell(x, target, weight, options):  # pylint: disable=unused-argument
    cell = ms_xent.nn.CrossEntropyLoss(label_smoothing=options.get("label_smoothing", 0.0),
                                       lse_square_scale_for_zloss=options.get(
                                           "lse_square_scale_for_zloss", 0.0))
    mask = ms.Tensor(np.ones(x.shape[0], np.float32))
    loss, grad = ms.value_and_grad(lambda logits: cell(logits, target, mask).sum())(x)
    return [loss, grad]


def _bce(x, target, weight, options):  # pylint: disable=unused-argument
    labels = ms.Tensor((target.asnumpy() % 2).astype(np.float32)).reshape(-1, 1) * ms.ops.ones(
        (1, x.shape[1]), ms.float32)
    pos_weight = ms.Tensor(np.full(x.shape[1], 2.0, np.float32)) if options.get("pos") else None
    loss, grad = ms.value_and_grad(lambda logits: binary_cross_entropy_with_logits(
        logits, labels.astype(logits.dtype), None, pos_weight, "mean"))(x)
    return [loss, grad]


def _linear(x, target, weight, options):  # pylint: disable=unused-argument
    hidden = x[:, :64]
    classes = ms.Tensor(np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
                        * 0.1).astype(x.dtype)
    loss, grads = ms.value_and_grad(lambda h, w: linear_cross_entropy(h, w, target % 256),
                                    (0, 1))(hidden, classes)
    return [loss, grads[0], grads[1]]


def cases(quick, only=None):
    """[(api, options name, options, function, dtypes)]; ``only``: a substring of the api names."""
    dtypes = ("float32", "bfloat16") if quick else tuple(DTYPES)
    listed = [("cross_entropy_loss", name, options, _cross_entropy, dtypes)
              for name, options in CROSS_ENTROPY_OPTIONS.items()
              if not quick or name in ("mean", "z-loss 1e-3")]
    listed += [("cross_entropy_rows", "lse^2 term", {}, _rows, dtypes),
               ("cross_entropy_rows", "label_smoothing 0.1", {"label_smoothing": 0.1}, _rows,
                ("float32",)),
               ("CrossEntropyLoss Cell", "z-loss 1e-4", {"lse_square_scale_for_zloss": 1e-4},
                _cell, dtypes),
               ("binary_cross_entropy_with_logits", "mean", {}, _bce, dtypes),
               ("binary_cross_entropy_with_logits", "pos_weight", {"pos": True}, _bce,
                ("float32",)),
               ("linear_cross_entropy", "mean", {}, _linear, ("float32",))]
    return [case for case in listed if only is None or only in case[0]]


def _run(request, variant, function, inputs, options):
    previous = os.environ.get("MS_XENT_ASCEND_BACKEND")
    if variant is not None:
        os.environ["MS_XENT_ASCEND_BACKEND"] = variant
    try:
        with ms_xent.use_backend(request):
            return [value.astype(ms.float32).asnumpy().astype(np.float64)
                    for value in function(*inputs, options)]
    finally:
        if variant is not None:
            if previous is None:
                del os.environ["MS_XENT_ASCEND_BACKEND"]
            else:
                os.environ["MS_XENT_ASCEND_BACKEND"] = previous


def run(quick=False, mode="pynative", only=None):
    """Runs every case on every route; returns the table rows (dicts)."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    x32, target, weight = _case_inputs(0)
    rows = []
    for api, options_name, options, function, dtypes in cases(quick, only):
        for dtype_name in dtypes:
            x = ms.Tensor(x32).astype(DTYPES[dtype_name])
            inputs = (x, ms.Tensor(target), ms.Tensor(weight))
            reference_inputs = (x.astype(ms.float32),) + inputs[1:]
            try:
                reference = _run(REFERENCE, None, function, reference_inputs, options)
            except Exception as failure:  # pylint: disable=broad-except
                reference = failure
            for route, request, variant in routes():
                start = time.perf_counter()
                with PeakMemory() as memory:
                    try:
                        if isinstance(reference, Exception):
                            raise RuntimeError(f"the {REFERENCE} reference failed: "
                                               f"{reference}") from reference
                        results = _run(request, variant, function, inputs, options)
                        error = max(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
                                    for got, want in zip(results, reference))
                        status = "pass" if error <= TOLERANCE[dtype_name] else "FAIL"
                        detail = f"{error:.2e}"
                    except Exception as failure:  # pylint: disable=broad-except
                        status, detail = "ERROR", f"{type(failure).__name__}: {str(failure)[:80]}"
                elapsed = (time.perf_counter() - start) * 1e3
                rows.append({"route": route, "api": api, "options": options_name,
                             "dtype": dtype_name, "status": status, "max rel. error": detail,
                             "time ms": f"{elapsed:.1f}", "peak MiB": f"{memory.mib:.1f}"})
    return rows


COLUMNS = ("route", "api", "options", "dtype", "status", "max rel. error", "time ms", "peak MiB")


def markdown(rows, mode):
    device = ms.get_context("device_target")
    lines = [f"# ms_xent self-check ({device}, {mode}, MindSpore {ms.__version__})", ""]
    if device == "CPU":
        lines += ["On CPU the vendor (Ascend) operators are EMULATED (`ascend_emulated`): the "
                  "Ascend-route code runs for real, the aclnn calls are a CPU stand-in with the "
                  "vendor's documented contract.", ""]
    lines += [f"Reference: the composed route in float32 on the same rounded inputs; tolerance "
              f"(max |diff| / max |reference|): {TOLERANCE}. Memory: "
              f"{'device peak' if device == 'Ascend' else 'peak resident set'} above the case's start "
              "(first calls include compilation and kernel loading). Times are wall-clock, first "
              "call included, one run: indicative only.",
              "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[column] for column in COLUMNS) + " |" for row in rows]
    failed = sum(row["status"] != "pass" for row in rows)
    lines += ["", f"{len(rows) - failed} passed, {failed} failed."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ms_xent.selfcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    parser.add_argument("--quick", action="store_true", help="fewer options and dtypes")
    parser.add_argument("--mode", choices=("pynative", "graph"), default="pynative")
    parser.add_argument("--only", metavar="API", help="only the APIs whose name contains API")
    arguments = parser.parse_args(argv)
    rows = run(quick=arguments.quick, mode=arguments.mode, only=arguments.only)
    text = markdown(rows, arguments.mode)
    print(text)
    if arguments.markdown:
        with open(arguments.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 1 if any(row["status"] != "pass" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
