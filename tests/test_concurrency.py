"""Two threads calling the fused kernels at the same time get the single-threaded results.

What is tested: the production kernel library (``ms_xent._backends.cpu.build.kernel_library()``, the
one every ops.Custom primitive runs) called from two Python threads at once through its C ABI,
exactly as MindSpore's aot launcher calls it. ctypes releases the GIL during a foreign call, so
both kernels really run concurrently: one thread's kernels with an OpenMP team of two (the inputs
are above the kernels' parallel threshold), the other's serially. Called: cross-entropy forward
(with log_prob for class targets, without for probability targets; int32 / int64 targets),
backward (from logits and from log-probabilities, both target kinds), and BCE with logits
forward, summed forward and backward, in float32 / float16 / bfloat16. Results must be
bit-identical to the same calls made by one thread (the kernels are deterministic), and the
single-threaded results match the float64 oracle.

What is not tested, and why: calling the ops from two Python threads in PyNative mode. MindSpore
2.9's PyNative dispatch is not thread-safe by itself: two threads running only builtin ops
(astype, cat, select, exp, sum) abort in ``mindspore::runtime::AsyncRQueue::Push``
(``std::terminate``: its worker thread is created lazily without a lock and its task queue has a
single producer), segfault with ``ms.runtime.launch_blocking()`` or MS_DEV_HOST_BLOCKING_RUN=1,
and ``ms.grad`` from two threads fails with "Can not find top cell for backward". Nothing in
ms_xent can make that safe; the ms_xent part of the path, the kernels, is what this test covers.
"""

import ctypes
import threading

import numpy as np
import mindspore as ms

from ms_xent._backends.cpu.build import kernel_library
from tests.reference import (assert_close, assert_close_to_peak, numpy_cross_entropy, rounded,
                             to_ms, to_numpy, torch_bce_with_logits)

ROUNDS = 5
OK = 0


class Operand:
    """A kernel operand: a contiguous numpy buffer (bfloat16 as its uint16 bit patterns) and
    the dtype name the kernel dispatches on."""

    def __init__(self, values, dtype):
        self.dtype = dtype
        if dtype == "bfloat16":
            self.array = to_ms(values, ms.bfloat16).view(ms.uint16).asnumpy().copy()
        else:
            self.array = np.ascontiguousarray(values, dtype=dtype)

    @classmethod
    def empty(cls, shape, dtype):
        return cls(np.zeros(shape), dtype)

    def value(self):
        """float64 copy of the buffer."""
        if self.dtype == "bfloat16":
            return to_numpy(ms.Tensor(self.array).view(ms.bfloat16))
        return self.array.astype(np.float64)


def call(symbol, operands):
    """Calls kernel ``symbol`` with default attributes (no AotExtra); returns the outputs' values
    (every operand after the inputs is written by the kernel; all are returned)."""
    function = getattr(ctypes.CDLL(kernel_library()), symbol)
    function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6
    count = len(operands)
    params = (ctypes.c_void_p * count)(*[op.array.ctypes.data for op in operands])
    ndims = (ctypes.c_int * count)(*[op.array.ndim for op in operands])
    shape_arrays = [(ctypes.c_int64 * max(op.array.ndim, 1))(*op.array.shape) for op in operands]
    shapes = (ctypes.POINTER(ctypes.c_int64) * count)(
        *[ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64)) for shape in shape_arrays])
    dtypes = (ctypes.c_char_p * count)(*[op.dtype.encode() for op in operands])
    status = function(count, params, ndims, shapes, dtypes, None, None)
    assert status == OK, f"{symbol} returned {status}"
    return [op.value() for op in operands]


def logits_case(seed, n_rows=301, n_classes=2049):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_classes)) * 3
    t = rng.integers(0, n_classes, n_rows)
    t[rng.random(n_rows) < 0.2] = -100
    soft = rng.random((n_rows, n_classes))
    return x, t, soft / soft.sum(axis=1, keepdims=True)


def cross_entropy_calls(dtype, index_dtype, seed):
    """Forward with log_prob, backward from the logits and from log_prob, soft forward and
    backward: a list of (label, outputs)."""
    x, t, soft = logits_case(seed)
    n_rows, n_classes = x.shape
    inputs = [Operand(x, dtype), Operand(t, index_dtype), Operand(np.ones(n_classes), "float32")]
    # Outputs: loss_rows, lse, row_weight, then the backward's shift state (row_max, row_log_sum).
    rows = [Operand.empty(n_rows, "float32") for _ in range(5)]
    forward = call("XentHardForwardLogProb",
                   inputs + rows + [Operand.empty((n_rows, n_classes), dtype)])
    loss_rows, lse, log_prob = forward[3], forward[4], forward[8]
    row_grad = Operand(np.linspace(-1, 1, n_rows), "float32")
    row_grad_lse = Operand(np.full(n_rows, 0.1), "float32")
    zeros = np.zeros(n_rows)
    backward = [call("XentHardBackward",
                     [Operand(source, dtype), inputs[1], inputs[2], Operand(shift_max, "float32"),
                      Operand(shift_log_sum, "float32"), row_grad, row_grad_lse,
                      Operand.empty((n_rows, n_classes), dtype)])[-1]
                for source, shift_max, shift_log_sum in ((x, forward[6], forward[7]),
                                                         (log_prob, zeros, zeros))]
    soft_inputs = [Operand(x, dtype), Operand(soft, dtype), inputs[2]]
    soft_forward = call("XentSoftForward",
                        soft_inputs + [Operand.empty(n_rows, "float32") for _ in range(4)])
    soft_backward = call("XentSoftBackward",
                         soft_inputs + [Operand(soft_forward[5], "float32"),
                                        Operand(soft_forward[6], "float32"), row_grad,
                                        row_grad_lse, Operand.empty((n_rows, n_classes), dtype)])
    return [loss_rows, lse, log_prob] + backward + soft_forward[3:5] + [soft_backward[-1]]


def bce_calls(dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (64, 1025)
    x, t = rng.standard_normal(shape) * 4, rng.random(shape)
    inputs = [Operand(x, dtype), Operand(t, dtype), Operand(np.ones(()), "float32"),
              Operand(rng.random(shape[-1:]) * 3, "float32")]
    loss = call("BceWithLogitsForward", inputs + [Operand.empty(shape, dtype)])[-1]
    total = call("BceWithLogitsForwardSum", inputs + [Operand.empty((1,), "float32")])[-1]
    grads = call("BceWithLogitsBackward",
                 inputs + [Operand(np.ones(shape), dtype), Operand.empty(shape, dtype),
                           Operand.empty(shape, dtype)])[-2:]
    return [loss, total] + grads


THREAD_CALLS = {
    "A": [("cross-entropy float32 int64", lambda: cross_entropy_calls("float32", "int64", 1)),
          ("BCE bfloat16", lambda: bce_calls("bfloat16", 2)),
          ("cross-entropy float16 int32", lambda: cross_entropy_calls("float16", "int32", 3))],
    "B": [("cross-entropy bfloat16 int32", lambda: cross_entropy_calls("bfloat16", "int32", 4)),
          ("BCE float32", lambda: bce_calls("float32", 5)),
          ("cross-entropy float32 int32", lambda: cross_entropy_calls("float32", "int32", 6))],
}


# OpenMP team size of the kernels called from each thread (a per-thread setting in libgomp):
# one thread runs its kernels serially, the other with a team of two.
OMP_THREADS = {"A": 1, "B": 2}


def run_thread(name, barrier, results, errors):
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(OMP_THREADS[name])
        barrier.wait()
        for round_index in range(ROUNDS):
            for label, calls in THREAD_CALLS[name]:
                results.append((f"{name}: {label} (round {round_index})", label, calls()))
    except Exception as error:  # pylint: disable=broad-except
        errors.append((name, repr(error)))


def test_two_threads_calling_the_kernels_at_once_get_the_single_threaded_results():
    barrier = threading.Barrier(2)
    results = {name: [] for name in THREAD_CALLS}
    errors = []
    threads = [threading.Thread(target=run_thread, args=(name, barrier, results[name], errors))
               for name in THREAD_CALLS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert not errors, errors

    single = {label: calls() for entries in THREAD_CALLS.values() for label, calls in entries}
    for name, entries in THREAD_CALLS.items():
        assert len(results[name]) == ROUNDS * len(entries)
        for what, label, outputs in results[name]:
            assert len(outputs) == len(single[label])
            for threaded, alone in zip(outputs, single[label]):
                np.testing.assert_array_equal(threaded, alone, err_msg=what)
    check_against_the_oracle(single)


def check_against_the_oracle(single):
    """The single-threaded results are right, so the comparison above is with correct values."""
    x, t, _ = logits_case(1)
    ref = numpy_cross_entropy(x, t, reduction="none")
    loss_rows, lse, log_prob, grad_from_logits, grad_from_log_prob = \
        single["cross-entropy float32 int64"][:5]
    assert_close(loss_rows, ref["loss"], ms.float32, "loss rows")
    assert_close(lse, ref["lse"], ms.float32, "lse")
    assert_close(log_prob, ref["log_prob"], ms.float32, "log_prob")
    row_grad = np.linspace(-1, 1, len(t))
    expected = row_grad[:, None] * ref["grad"] + 0.1 * np.exp(ref["log_prob"])
    assert_close_to_peak(grad_from_logits, expected, ms.float32, "grad from logits")
    assert_close_to_peak(grad_from_log_prob, expected, ms.float32, "grad from log_prob")

    rng = np.random.default_rng(2)
    shape = (64, 1025)
    x = rounded(rng.standard_normal(shape) * 4, ms.bfloat16)
    t = rounded(rng.random(shape), ms.bfloat16)
    pos_weight = rng.random(shape[-1:]) * 3
    ref_loss, ref_grad_x, ref_grad_t = torch_bce_with_logits(x, t, pos_weight=pos_weight,
                                                             reduction="none")
    loss, total, grad_x, grad_t = single["BCE bfloat16"]
    assert_close(loss, ref_loss, ms.bfloat16, "BCE loss")
    assert_close(total, ref_loss.sum(), ms.float32, "BCE sum")
    assert_close(grad_x, ref_grad_x, ms.bfloat16, "BCE grad input")
    assert_close_to_peak(grad_t, ref_grad_t, ms.bfloat16, "BCE grad target")
