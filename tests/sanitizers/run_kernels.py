"""Calls every exported ms_xent CPU kernel directly, with fuzz-style inputs, for a sanitizer run.

Run through ``bash tests/sanitizers/run.sh``, which builds the kernel library with
AddressSanitizer + UndefinedBehaviorSanitizer (``MS_XENT_EXTRA_CXXFLAGS``) into a separate cache
(``MS_XENT_CACHE_DIR``) and starts this script with the ASan runtime preloaded. Any sanitizer
report aborts the process (non-zero exit); a kernel return code other than the expected one is
reported here and also makes the exit status non-zero.

No MindSpore: the kernels are called through their C ABI,
``int Fn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
void *stream, void *extra)``, exactly as MindSpore's aot launcher calls them. Every buffer the
kernels see (tensor data, and the params / ndims / shapes / dtypes arrays themselves) is allocated
with malloc at its exact size, so ASan's redzone starts at the first byte past the end: a read
or write one element out of bounds is reported. Non-default attributes (ignore_index, label
smoothing, class weights) reach the kernels through their ``<Name>Init`` functions and a
test-only AotExtra (``fake_aot_extra.cc``, compiled only here).

Inputs: targets out of range (C, beyond C, negative, int32 / int64 extremes), ignore_index
-100 / -1 / a valid class / int64 min, logits +-inf, NaN, +-FLT_MAX, 1e38, denormals, rows that
are -inf but for one entry, whole -inf rows, C = 1, C not a multiple of 16, C around the kernel
block (2048), C > 65536, N = 0, odd N, N * C above the OpenMP threshold, logit scale / softcap,
weights of either sign, non-finite weights (refused: kWeightNotFinite), weights of 1e37 and
1e-40; cross-entropy results against a float64 numpy reference (ce_reference: every output and
option, and the accuracy goal at offsets up to 3e38 and p_y up to 1 - 1e-7); BCE with any rank
(0 to 16, and 17: refused), zero-size dims, broadcast weight / pos_weight, logits -120 / +-inf /
NaN; and malformed calls (wrong parameter counts, ranks, shapes, dtypes), which must return
kBadArguments (1) without touching memory they do not own. A canary pass repeats the kernels on
finite inputs with guard bytes after every buffer, for the AVX-512 masked loads and stores that
ASan does not instrument (see Kernels.call).
"""

import ctypes
import importlib.util
import itertools
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OK, BAD_ARGUMENTS, TARGET_OUT_OF_RANGE = 0, 1, 2
FLT_MAX = float(np.finfo(np.float32).max)
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
               "int32": np.int32, "int64": np.int64, "float64": np.float64, "int8": np.int8,
               "int16": np.int16}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


def load_kernel_build():
    """ms_xent/_backends/cpu/build.py, loaded by path: importing the ms_xent package imports MindSpore."""
    spec = importlib.util.spec_from_file_location(
        "ms_xent_kernel_build", os.path.join(REPO, "ms_xent", "_backends", "cpu", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CANARY_BYTES = 64
CANARY = 0x7F  # 0x7F7F7F7F: float32 3.4e38; bfloat16 3.4e38; float16 NaN; int32/int64 huge


class Allocations:
    """malloc'd blocks, freed together. Exact size by default (ASan's redzone starts right after
    the data); with ``canary``, followed by CANARY_BYTES bytes of CANARY that must survive."""

    def __init__(self, canary=False):
        self.canary = canary
        self.blocks = []

    def raw(self, data: bytes):
        pad = CANARY_BYTES if self.canary else 0
        pointer = _libc.malloc(len(data) + pad)
        assert pointer, "malloc failed"
        ctypes.memmove(pointer, data, len(data))
        ctypes.memset(pointer + len(data), CANARY, pad)
        self.blocks.append((pointer, len(data), pad))
        return pointer

    def overwritten(self):
        """Number of blocks whose canary was written to."""
        return sum(ctypes.string_at(pointer + size, pad) != bytes([CANARY]) * pad
                   for pointer, size, pad in self.blocks if pad)

    def free(self):
        for pointer, _, _ in self.blocks:
            _libc.free(pointer)
        self.blocks = []


def to_bfloat16_bits(values):
    """float32 -> bfloat16 bit patterns, round to nearest even, NaN kept quiet."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


class Tensor:
    """A kernel operand: dtype name, shape and the bytes of its data (C order)."""

    def __init__(self, dtype, shape, values=None):
        self.dtype = dtype
        self.shape = tuple(int(d) for d in shape)
        count = int(np.prod(self.shape, dtype=np.int64))
        if values is None:
            values = np.zeros(count)
        values = np.asarray(values).reshape(-1)
        assert values.size == count, (dtype, shape, values.size)
        if dtype == "bfloat16":
            self.data = to_bfloat16_bits(values.astype(np.float32)).tobytes()
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                self.data = values.astype(NUMPY_TYPES[dtype]).tobytes()
        self.pointer = None

    def read(self):
        """The data after the call, as float64 (or int64) numpy."""
        raw = ctypes.string_at(self.pointer, len(self.data))
        if self.dtype == "bfloat16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).astype(np.float64).reshape(self.shape)
        return np.frombuffer(raw, NUMPY_TYPES[self.dtype]).astype(np.float64).reshape(self.shape)


class Kernels:
    """The sanitized kernel library and the test-only AotExtra library."""

    def __init__(self, kernel_library, extra_library):
        self.lib = ctypes.CDLL(kernel_library)
        self.extra_lib = ctypes.CDLL(extra_library)
        self.extra_lib.MsXentTestNewExtra.restype = ctypes.c_void_p
        self.extra_lib.MsXentTestDeleteExtra.argtypes = [ctypes.c_void_p]
        self.extra_lib.MsXentTestSetInt.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                    ctypes.c_int64]
        self.extra_lib.MsXentTestSetFloat.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                      ctypes.c_float]
        self.extra_lib.MsXentTestSetBool.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                     ctypes.c_int]
        self.extra_lib.MsXentTestSetStr.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                    ctypes.c_char_p]
        self.calls = 0
        self.failures = []

    def _arrays(self, memory, tensors):
        n = len(tensors)
        for tensor in tensors:
            tensor.pointer = memory.raw(tensor.data)
        params = memory.raw(np.array([t.pointer for t in tensors], np.uint64).tobytes())
        ndims = memory.raw(np.array([len(t.shape) for t in tensors], np.int32).tobytes())
        shape_pointers = [memory.raw(np.array(t.shape, np.int64).tobytes()) for t in tensors]
        shapes = memory.raw(np.array(shape_pointers, np.uint64).tobytes())
        names = [memory.raw(t.dtype.encode() + b"\0") for t in tensors]
        dtypes = memory.raw(np.array(names, np.uint64).tobytes())
        return n, params, ndims, shapes, dtypes

    def call(self, symbol, tensors, expected, attrs=None, what="", canary=False):
        """Calls ``symbol`` (after ``<symbol>Init`` when ``attrs`` is given); records a failure
        if it returns anything but ``expected`` or, with ``canary``, if it wrote past the end of
        any buffer. Returns the tensors' values after the call.

        The canary pass covers what ASan does not see: GCC does not instrument the AVX-512
        masked loads and stores that the row kernels issue through intrinsics. A wrong tail mask
        would write into a canary (reported here) or read one (a huge or NaN value: the callers
        check that finite inputs give finite outputs)."""
        memory = Allocations(canary)
        extra = None
        try:
            n, params, ndims, shapes, dtypes = self._arrays(memory, tensors)
            if attrs is not None:
                extra = self.extra_lib.MsXentTestNewExtra()
                for name, value in attrs.items():
                    if isinstance(value, bool):
                        self.extra_lib.MsXentTestSetBool(extra, name.encode(), int(value))
                    elif isinstance(value, int):
                        self.extra_lib.MsXentTestSetInt(extra, name.encode(), value)
                    elif isinstance(value, str):
                        self.extra_lib.MsXentTestSetStr(extra, name.encode(), value.encode())
                    else:
                        self.extra_lib.MsXentTestSetFloat(extra, name.encode(), value)
                init = getattr(self.lib, symbol + "Init")
                init.argtypes = [ctypes.c_void_p] * 4
                status = init(ndims, shapes, dtypes, extra)
                if status != OK:
                    self.failures.append(f"{symbol}Init returned {status} ({what})")
            entry = getattr(self.lib, symbol)
            entry.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 6
            status = entry(n, params, ndims, shapes, dtypes, None, extra)
            self.calls += 1
            if status != expected:
                self.failures.append(f"{symbol} returned {status}, expected {expected} ({what})")
            results = [t.read() for t in tensors]
            if canary and memory.overwritten():
                self.failures.append(f"{symbol} wrote past the end of "
                                     f"{memory.overwritten()} buffer(s) ({what})")
        finally:
            if extra is not None:
                self.extra_lib.MsXentTestDeleteExtra(extra)
            memory.free()
        return results


# ---- cross-entropy -----------------------------------------------------------------------------

WEIGHT_NOT_FINITE = 3
CE_SHAPES = [(0, 5), (1, 1), (3, 1), (5, 15), (7, 16), (9, 17), (2, 33), (3, 2047), (1, 2048),
             (2, 2049), (1, 4097), (301, 131), (2, 70001)]
CE_ATTRS = [
    {"ignore_index": -100, "label_smoothing": 0.0, "weighted": False, "logit_scale": 1.0,
     "logit_softcap": 0.0},
    {"ignore_index": -1, "label_smoothing": 0.1, "weighted": True, "logit_scale": 0.5,
     "logit_softcap": 0.0},
    {"ignore_index": 2, "label_smoothing": 0.5, "weighted": False, "logit_scale": 1.0,
     "logit_softcap": 30.0},
    {"ignore_index": -2 ** 63, "label_smoothing": 0.999, "weighted": True, "logit_scale": -2.0,
     "logit_softcap": 5.0},
]
LOGIT_PATTERNS = ("normal", "specials", "minus_inf_rows", "all_but_one_minus_inf", "extremes",
                  "denormal")
# The optional last output of the forward kernels: suffix of the symbol, and the tensor.
FORWARD_EXTRAS = {None: "", "log_prob": "LogProb", "int32": "Argmax", "int64": "Argmax"}


def ce_logits(rng, pattern, n, c):
    x = rng.standard_normal((n, c)) * 5
    if pattern == "specials":
        picks = rng.random((n, c))
        x[picks < 0.05] = np.nan
        x[(picks >= 0.05) & (picks < 0.1)] = np.inf
        x[(picks >= 0.1) & (picks < 0.3)] = -np.inf
    elif pattern == "minus_inf_rows":
        x[rng.random(n) < 0.5] = -np.inf
    elif pattern == "all_but_one_minus_inf":
        keep = rng.integers(0, c, n)
        kept = x[np.arange(n), keep]
        x[:] = -np.inf
        x[np.arange(n), keep] = kept
    elif pattern == "extremes":
        x = rng.choice([FLT_MAX, -FLT_MAX, 1e38, -1e38, 65504.0, -65504.0, 0.0], (n, c))
    elif pattern == "denormal":
        x = rng.choice([1e-45, -1e-45, 1e-40, 0.0, -0.0], (n, c))
    return x


def ce_targets(rng, n, c, ignore_index, index_dtype, out_of_range):
    """Targets with some ignored rows, and (when ``out_of_range``) some values outside [0, C)."""
    info = np.iinfo(NUMPY_TYPES[index_dtype])
    t = rng.integers(0, c, n).astype(np.int64)
    if info.min <= ignore_index <= info.max:
        t[rng.random(n) < 0.3] = ignore_index
    if out_of_range and n:
        bad = [c, c + 7, -5, info.min, info.max]
        if ignore_index != -1:
            bad.append(-1)
        rows = rng.random(n) < 0.4
        rows[rng.integers(0, n)] = True
        t[rows] = rng.choice(bad, int(rows.sum()))
    counted = t != ignore_index
    expected = TARGET_OUT_OF_RANGE if ((t[counted] < 0) | (t[counted] >= c)).any() else OK
    return t, expected


def ce_weight(rng, c):
    """Class weights of either sign, some zero."""
    w = rng.random(c) + 0.25
    w[rng.random(c) < 0.3] = 0.0
    w[rng.random(c) < 0.1] *= -1.0
    return w


def hard_forward(kernels, dtype, x, t, w, attrs, expected=OK, extra=None, index_dtype="int64",
                 what="", canary=False):
    """XentHardForward[LogProb|Argmax]: dict of the outputs (float64 / int values)."""
    n, c = x.shape
    tensors = [Tensor(dtype, (n, c), x), Tensor(index_dtype, (n,), t), Tensor("float32", (c,), w)]
    tensors += [Tensor("float32", (n,)) for _ in range(5)]
    if extra == "log_prob":
        tensors.append(Tensor(dtype, (n, c)))
    elif extra is not None:
        tensors.append(Tensor(extra, (n,)))
    out = kernels.call("XentHardForward" + FORWARD_EXTRAS[extra], tensors, expected, attrs, what,
                       canary)
    names = ("loss", "lse", "row_weight", "row_max", "row_log_sum", "extra")
    return dict(zip(names, out[3:]))


def hard_backward(kernels, dtype, x, t, w, shift, row_grad, row_grad_lse, attrs, expected=OK,
                  index_dtype="int64", what="", canary=False):
    """XentHardBackward with shift = (shift_max, shift_log_sum): the gradient."""
    n, c = x.shape
    tensors = [Tensor(dtype, (n, c), x), Tensor(index_dtype, (n,), t), Tensor("float32", (c,), w),
               Tensor("float32", (n,), shift[0]), Tensor("float32", (n,), shift[1]),
               Tensor("float32", (n,), row_grad), Tensor("float32", (n,), row_grad_lse),
               Tensor(dtype, (n, c))]
    return kernels.call("XentHardBackward", tensors, expected, attrs, what, canary)[-1]


def soft_forward(kernels, dtype, x, t, w, attrs, expected=OK, extra=None, what="", canary=False):
    n, c = x.shape
    tensors = [Tensor(dtype, (n, c), x), Tensor(dtype, (n, c), t), Tensor("float32", (c,), w)]
    tensors += [Tensor("float32", (n,)) for _ in range(4)]
    if extra == "log_prob":
        tensors.append(Tensor(dtype, (n, c)))
    elif extra is not None:
        tensors.append(Tensor(extra, (n,)))
    out = kernels.call("XentSoftForward" + FORWARD_EXTRAS[extra], tensors, expected, attrs, what,
                       canary)
    names = ("loss", "lse", "row_max", "row_log_sum", "extra")
    return dict(zip(names, out[3:]))


def soft_backward(kernels, dtype, x, t, w, shift, row_grad, row_grad_lse, attrs, expected=OK,
                  with_target=False, what="", canary=False):
    """XentSoftBackward[Target]: [grad] or [grad, grad_target]."""
    n, c = x.shape
    tensors = [Tensor(dtype, (n, c), x), Tensor(dtype, (n, c), t), Tensor("float32", (c,), w),
               Tensor("float32", (n,), shift[0]), Tensor("float32", (n,), shift[1]),
               Tensor("float32", (n,), row_grad), Tensor("float32", (n,), row_grad_lse),
               Tensor(dtype, (n, c))]
    if with_target:
        tensors.append(Tensor(dtype, (n, c)))
    symbol = "XentSoftBackwardTarget" if with_target else "XentSoftBackward"
    return kernels.call(symbol, tensors, expected, attrs, what, canary)[7:]


def run_cross_entropy(kernels, rng):
    combos = list(itertools.product(FLOAT_DTYPES, ("int32", "int64"), CE_SHAPES))
    for number, (dtype, index_dtype, (n, c)) in enumerate(combos):
        for variant in range(3):
            attrs = CE_ATTRS[(number + variant) % len(CE_ATTRS)]
            pattern = LOGIT_PATTERNS[(number * 3 + variant) % len(LOGIT_PATTERNS)]
            out_of_range = variant == 2
            what = f"{dtype} {index_dtype} N={n} C={c} {pattern} {attrs} bad_targets={out_of_range}"
            x = ce_logits(rng, pattern, n, c)
            t, expected = ce_targets(rng, n, c, attrs["ignore_index"], index_dtype, out_of_range)
            w = ce_weight(rng, c)
            common = dict(expected=expected, index_dtype=index_dtype, what=what)
            forward = hard_forward(kernels, dtype, x, t, w, attrs, extra="log_prob", **common)
            hard_forward(kernels, dtype, x, t, w, attrs, **common)
            hard_forward(kernels, dtype, x, t, w, attrs, extra=index_dtype, **common)
            row_grad = rng.choice([0.0, 1.0, -0.5, np.nan, 3e38], n)
            row_grad_lse = rng.choice([0.0, 0.0, 0.25, -np.inf], n)
            for source, shift in ((x, (forward["row_max"], forward["row_log_sum"])),
                                  (forward["extra"], (np.zeros(n), np.zeros(n)))):
                hard_backward(kernels, dtype, source, t, w, shift, row_grad, row_grad_lse, attrs,
                              **common)
            soft_t = rng.choice([0.0, 0.5, 1.0, 0.01, np.nan, -1.0, 2.0, np.inf], (n, c))
            soft = soft_forward(kernels, dtype, x, soft_t, w, attrs, extra="log_prob",
                                what=what + " soft")
            soft_forward(kernels, dtype, x, soft_t, w, attrs, what=what + " soft")
            soft_forward(kernels, dtype, x, soft_t, w, attrs, extra="int64", what=what + " soft")
            for with_target in (False, True):
                soft_backward(kernels, dtype, x, soft_t, w, (soft["row_max"], soft["row_log_sum"]),
                              row_grad, row_grad_lse, attrs, with_target=with_target,
                              what=what + " soft backward")
    run_cross_entropy_canaries(kernels, rng)
    # Without an AotExtra (extra = NULL) the kernels use their default attributes.
    x = ce_logits(rng, "normal", 4, 19)
    hard_forward(kernels, "float32", x, np.array([0, -100, 18, 3]), np.ones(19), None,
                 what="default attributes")
    run_cross_entropy_malformed(kernels)
    run_cross_entropy_reference(kernels, rng)
    run_cross_entropy_accuracy(kernels, rng)
    run_cross_entropy_weights(kernels, rng)


def check_finite(kernels, symbol, outputs, what):
    for index, values in enumerate(outputs):
        if not np.isfinite(values).all():
            kernels.failures.append(f"{symbol}: non-finite output {index} for finite inputs, "
                                    f"a read past the end? ({what})")


def run_cross_entropy_canaries(kernels, rng):
    """Every kernel on finite inputs with canary-padded buffers, for every dtype, C around the
    16-lane vector width and the 2048 block, and N * C above the OpenMP threshold; and gradients
    above 64 MiB (the backward's streaming stores, rows at every offset in a line), with and
    without class weights (bfloat16 takes a different store path without)."""
    shapes = [(3, 1), (2, 15), (2, 16), (2, 17), (5, 31), (2, 2047), (1, 2049), (301, 131)]
    cases = [(dtype, shape, True, number % len(CE_ATTRS))
             for number, (dtype, shape) in enumerate(itertools.product(FLOAT_DTYPES, shapes))]
    cases += [("float32", (1025, 16385), True, 0), ("bfloat16", (2049, 16385), False, 2),
              ("bfloat16", (2049, 16385), True, 1), ("float16", (2049, 16385), False, 0)]
    for dtype, (n, c), weighted, attrs_number in cases:
        attrs = dict(CE_ATTRS[attrs_number], ignore_index=-100, weighted=weighted)
        what = f"canary {dtype} N={n} C={c} {attrs}"
        x = rng.standard_normal((n, c)) * 3
        t = rng.integers(0, c, n)
        w = rng.random(c) + 0.25
        out = hard_forward(kernels, dtype, x, t, w, attrs, extra="log_prob", what=what,
                           canary=True)
        check_finite(kernels, "XentHardForwardLogProb", list(out.values()), what)
        out_argmax = hard_forward(kernels, dtype, x, t, w, attrs, extra="int32", what=what,
                                  canary=True)
        check_finite(kernels, "XentHardForwardArgmax", list(out_argmax.values()), what)
        shift = (out["row_max"], out["row_log_sum"])
        grad = hard_backward(kernels, dtype, x, t, w, shift, out["lse"], np.full(n, 0.5), attrs,
                             what=what, canary=True)
        check_finite(kernels, "XentHardBackward", [grad], what)
        soft = rng.random((n, c))
        soft /= soft.sum(1, keepdims=True)
        out = soft_forward(kernels, dtype, x, soft, w, attrs, extra="log_prob", what=what,
                           canary=True)
        check_finite(kernels, "XentSoftForwardLogProb", list(out.values()), what)
        out_argmax = soft_forward(kernels, dtype, x, soft, w, attrs, extra="int64", what=what,
                                  canary=True)
        check_finite(kernels, "XentSoftForwardArgmax", list(out_argmax.values()), what)
        grads = soft_backward(kernels, dtype, x, soft, w, (out["row_max"], out["row_log_sum"]),
                              np.ones(n), np.full(n, 0.5), attrs, with_target=True, what=what,
                              canary=True)
        check_finite(kernels, "XentSoftBackwardTarget", grads, what)


def run_cross_entropy_malformed(kernels):
    """Calls that MindSpore would never make (wrong counts, ranks, shapes, dtypes): each must
    return kBadArguments without reading or writing outside what it was given."""
    attrs = CE_ATTRS[1]
    n, c = 3, 5
    f32 = "float32"

    def forward(x_shape=(n, c), t=("int64", (n,)), w=(c,), dtype=f32, count=8, rows=(n,),
                row_dtype=f32):
        tensors = [Tensor(dtype, x_shape), Tensor(t[0], t[1]), Tensor(f32, w)]
        tensors += [Tensor(row_dtype, rows)] + [Tensor(f32, (n,)) for _ in range(4)]
        tensors += [Tensor(dtype, (n, c)), Tensor(f32, (n,))]
        return tensors[:count]

    def backward(shift=(n,), grad=(n, c), t=("int64", (n,)), dtype=f32, count=8, grad_dtype=None):
        tensors = [Tensor(dtype, (n, c)), Tensor(t[0], t[1]), Tensor(f32, (c,)), Tensor(f32, shift)]
        tensors += [Tensor(f32, (n,)) for _ in range(3)]
        tensors += [Tensor(grad_dtype or dtype, grad), Tensor(f32, (n,))]
        return tensors[:count]

    soft_inputs = [Tensor(f32, (n, c)), Tensor(f32, (n, c)), Tensor(f32, (c,))]
    rows = [Tensor(f32, (n,)) for _ in range(4)]
    cases = [("XentHardForward", forward(count=count)) for count in (0, 7, 9)]
    cases += [("XentHardForward", forward(**changes)) for changes in (
        {"x_shape": (n * c,)}, {"x_shape": (1, n, c)}, {"t": ("int64", (n + 1,))},
        {"t": ("int64", (n, 1))}, {"t": ("float32", (n,))}, {"t": ("int8", (n,))},
        {"w": (c + 1,)}, {"dtype": "float64"}, {"dtype": "int8"}, {"rows": (n + 1,)},
        {"row_dtype": "float16"})]
    cases += [("XentHardForwardLogProb", forward(count=8) + [Tensor(f32, (n, c + 1))]),
              ("XentHardForwardLogProb", forward(count=8) + [Tensor("float16", (n, c))]),
              ("XentHardForwardArgmax", forward(count=8) + [Tensor("float32", (n,))]),
              ("XentHardForwardArgmax", forward(count=8) + [Tensor("int64", (n + 1,))]),
              ("XentHardForwardArgmax", forward(count=8))]
    cases += [("XentHardBackward", backward(**changes)) for changes in (
        {"count": 7}, {"count": 9}, {"shift": (n + 1,)}, {"grad": (n, c + 1)},
        {"t": ("int16", (n,))}, {"dtype": "float64"}, {"grad_dtype": "float16"})]
    cases += [
        ("XentSoftForward", [soft_inputs[0], Tensor("float16", (n, c)), soft_inputs[2]] + rows),
        ("XentSoftForward", [soft_inputs[0], Tensor(f32, (n, c + 1)), soft_inputs[2]] + rows),
        ("XentSoftForward", soft_inputs + rows[:3]),
        ("XentSoftForwardArgmax", soft_inputs + rows + [Tensor("int16", (n,))]),
        ("XentSoftBackward", soft_inputs + [Tensor(f32, (n,))] * 4 + [Tensor(f32, (n + 1, c))]),
        ("XentSoftBackward", soft_inputs + [Tensor(f32, (n,))] * 3 + [Tensor(f32, (n, c))]),
        ("XentSoftBackwardTarget", soft_inputs + [Tensor(f32, (n,))] * 4 + [Tensor(f32, (n, c))]),
        ("XentSoftBackwardTarget", soft_inputs + [Tensor(f32, (n,))] * 4
         + [Tensor(f32, (n, c)), Tensor("float16", (n, c))]),
    ]
    for symbol, tensors in cases:
        shapes = [(t.dtype, t.shape) for t in tensors]
        kernels.call(symbol, tensors, BAD_ARGUMENTS, attrs, f"malformed {shapes}")


# ---- cross-entropy against a float64 reference --------------------------------------------------

def ce_reference(x, target, weight, attrs, row_grad, row_grad_lse, soft=False):
    """float64 numpy: per-row loss, lse, log_prob, argmax, and the gradients w.r.t. the logits and
    (soft targets) the target, for upstream per-row gradients row_grad (of the loss) and
    row_grad_lse (of lse)."""
    attrs = attrs or {"ignore_index": -100, "label_smoothing": 0.0, "weighted": False,
                      "logit_scale": 1.0, "logit_softcap": 0.0}
    scale, cap, eps = attrs["logit_scale"], attrs["logit_softcap"], attrs["label_smoothing"]
    n, c = x.shape
    z = scale * x
    if cap > 0:
        z = cap * np.tanh(z / cap)
    slope = scale * (1 - (z / cap) ** 2) if cap > 0 else np.full_like(z, scale)
    top = z.max(axis=1, keepdims=True)
    log_p = (z - top) - np.log(np.exp(z - top).sum(axis=1, keepdims=True))
    lse = (z - log_p)[:, 0]
    p = np.exp(log_p)
    w = rounded_to("float32", weight) if attrs["weighted"] else np.ones(c)
    b = row_grad_lse[:, None]
    out = {"lse": lse, "log_prob": log_p, "argmax": z.argmax(axis=1)}
    if soft:
        v = w * ((1 - eps) * target + eps / c)
        out["loss"] = -(v * log_p).sum(axis=1)
        a = row_grad[:, None]
        grad_z = a * (v.sum(axis=1, keepdims=True) * p - v) + b * p
        out["grad_target"] = -a * (1 - eps) * w * log_p
    else:
        counted = target != attrs["ignore_index"]
        y = np.where(counted, target, 0)
        rows = np.arange(n)
        out["loss"] = counted * (-(1 - eps) * w[y] * log_p[rows, y]
                                 - eps / c * (w * log_p).sum(axis=1))
        out["row_weight"] = counted * w[y]
        a = (row_grad * counted)[:, None]
        one_hot = np.zeros((n, c))
        one_hot[rows, y] = 1.0
        grad_z = a * ((1 - eps) * w[y][:, None] * (p - one_hot) + eps / c * (w.sum() * p - w))
        grad_z += b * p
    out["grad"] = grad_z * slope
    return out


def report_error(kernels, name, got, want, rtol, atol, what):
    """Records a failure where |got - want| > atol + rtol |want| (NaN must match NaN)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    both_nan = np.isnan(got) & np.isnan(want)
    with np.errstate(invalid="ignore"):
        bad = ~both_nan & ~(np.abs(got - want) <= atol + rtol * np.abs(want))
        bad &= ~(np.isinf(want) & (got == want))
    if bad.any():
        index = tuple(np.argwhere(bad)[0])
        kernels.failures.append(f"{name}: {int(bad.sum())} values off, e.g. at {index}: "
                                f"{got[index]!r} vs {want[index]!r} ({what})")


# (rtol, atol relative to the largest gradient) per input dtype, for finite random rows.
REFERENCE_TOLERANCE = {"float32": (2e-5, 2e-6), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}


def run_cross_entropy_reference(kernels, rng):
    """Every kernel and option (scale, softcap, smoothing, weights of either sign, soft targets,
    argmax, log_prob, target gradient) against ce_reference on finite random rows."""
    for number, (dtype, (n, c)) in enumerate(itertools.product(
            FLOAT_DTYPES, [(5, 7), (3, 40), (4, 2049), (2, 5000)])):
        for attrs in CE_ATTRS:
            what = f"reference {dtype} N={n} C={c} {attrs}"
            rtol, atol = REFERENCE_TOLERANCE[dtype]
            x = rounded_to(dtype, rng.standard_normal((n, c)) * 4)
            t = rng.integers(0, c, n)
            t[rng.random(n) < 0.3] = attrs["ignore_index"] if attrs["ignore_index"] > -2**62 else 0
            w = ce_weight(rng, c)
            row_grad, row_grad_lse = rng.standard_normal(n), rng.standard_normal(n) * 0.1
            want = ce_reference(x, t, w, attrs, row_grad, row_grad_lse)
            got = hard_forward(kernels, dtype, x, t, w, attrs, extra="log_prob", what=what)
            scale_loss = 1 + np.abs(want["loss"]).max()
            report_error(kernels, "loss", got["loss"], want["loss"], rtol, atol * scale_loss, what)
            report_error(kernels, "lse", got["lse"], want["lse"], rtol, atol, what)
            report_error(kernels, "lse = row_max + row_log_sum", got["row_max"] + got["row_log_sum"],
                         want["lse"], rtol, atol, what)
            report_error(kernels, "row_weight", got["row_weight"], want["row_weight"], 0, 0, what)
            report_error(kernels, "log_prob", got["extra"], want["log_prob"], rtol, atol * 10, what)
            argmax = hard_forward(kernels, dtype, x, t, w, attrs, extra="int64", what=what)["extra"]
            report_error(kernels, "argmax", argmax, want["argmax"], 0, 0, what)
            shift = (got["row_max"], got["row_log_sum"])
            grad = hard_backward(kernels, dtype, x, t, w, shift, row_grad, row_grad_lse, attrs,
                                 what=what)
            # With a softcap, dz/dx = s (1 - (z / cap)^2) loses digits where tanh saturates (as the
            # tanh backward of every framework does): 10x the tolerance.
            softcap_factor = 10 if attrs["logit_softcap"] > 0 else 1
            peak = np.abs(want["grad"]).max()
            report_error(kernels, "grad", grad, want["grad"], 0, atol * peak * softcap_factor,
                         what)
            soft_t = rng.random((n, c))
            soft_t /= soft_t.sum(axis=1, keepdims=True)
            soft_t = rounded_to(dtype, soft_t)
            want = ce_reference(x, soft_t, w, attrs, row_grad, row_grad_lse, soft=True)
            got = soft_forward(kernels, dtype, x, soft_t, w, attrs, extra="int32", what=what)
            scale_loss = 1 + np.abs(want["loss"]).max()
            report_error(kernels, "soft loss", got["loss"], want["loss"], rtol, atol * scale_loss,
                         what)
            report_error(kernels, "soft argmax", got["extra"], want["argmax"], 0, 0, what)
            grads = soft_backward(kernels, dtype, x, soft_t, w, (got["row_max"], got["row_log_sum"]),
                                  row_grad, row_grad_lse, attrs, with_target=True, what=what)
            for name, value in (("soft grad", grads[0]), ("soft grad_target", grads[1])):
                key = "grad" if name == "soft grad" else "grad_target"
                peak = np.abs(want[key]).max()
                report_error(kernels, name, value, want[key], rtol,
                             atol * peak * softcap_factor, what)
            # log-probabilities in, shift (0, 0): the gradient of cross_entropy_loss_grad.
            plain = dict(attrs, logit_scale=1.0, logit_softcap=0.0)
            log_p = rounded_to(dtype, want["log_prob"])
            want = ce_reference(log_p, t, w, plain, row_grad, row_grad_lse)
            grad = hard_backward(kernels, dtype, log_p, t, w, (np.zeros(n), np.zeros(n)),
                                 row_grad, row_grad_lse, plain, what=what + " from log_prob")
            report_error(kernels, "grad from log_prob", grad, want["grad"], 0,
                         atol * np.abs(want["grad"]).max() * (1 + 50 * (dtype != "float32"))
                         * softcap_factor, what + " from log_prob")


def accuracy_rows(rng, c):
    """(name, logits [1, C], target) rows where lse rounded to float32 loses the loss: constant
    offsets up to 3e38 (all equal, and with noise), and confident rows p_y = 1 - q."""
    cases = []
    for offset in (0.0, 1e6, 1e30, 3e38):
        cases.append((f"all {offset:g}", np.full((1, c), offset), 0))
        noisy = np.float32(offset) + (rng.standard_normal((1, c)) * 3).astype(np.float32)
        cases.append((f"{offset:g} + N(0, 3)", noisy.astype(np.float64), int(np.argmax(noisy))))
    for q in (1e-4, 1e-5, 1e-6, 1e-7):
        x = np.zeros((1, c))
        x[0, 3] = np.float32(np.log((c - 1) * (1 - q) / q))
        cases.append((f"p_y = 1 - {q:g}", x, 3))
        x = (rng.standard_normal((1, c)) * 0.5).astype(np.float32).astype(np.float64)
        x[0, 3] = np.float32(np.log(np.exp(np.delete(x[0], 3)).sum() * (1 - q) / q))
        cases.append((f"p_y = 1 - {q:g}, noisy", x, 3))
    return cases


def run_cross_entropy_accuracy(kernels, rng):
    """float32 logits: loss within 1e-5 relative and gradient within 1e-6 of the row's peak of
    float64, for large common offsets and confident rows, with one and several blocks per row,
    the target at the max or not, with and without smoothing / z-loss gradient."""
    attrs = dict(CE_ATTRS[0])
    for c in (10, 100, 5000):
        for name, x, y in accuracy_rows(rng, c):
            for eps, row_grad_lse in ((0.0, 0.0), (0.1, 0.0), (0.0, 1e-3)):
                what = f"accuracy C={c} {name} eps={eps} b={row_grad_lse}"
                case_attrs = dict(attrs, label_smoothing=eps)
                t = np.array([y])
                w = np.ones(c)
                ones, b = np.ones(1), np.full(1, row_grad_lse)
                want = ce_reference(x, t, w, case_attrs, ones, b)
                got = hard_forward(kernels, "float32", x, t, w, case_attrs, what=what)
                report_error(kernels, "accuracy loss", got["loss"], want["loss"], 1e-5, 0, what)
                grad = hard_backward(kernels, "float32", x, t, w,
                                     (got["row_max"], got["row_log_sum"]), ones, b, case_attrs,
                                     what=what)
                report_error(kernels, "accuracy grad", grad, want["grad"], 0,
                             1e-6 * np.abs(want["grad"]).max(), what)


def run_cross_entropy_weights(kernels, rng):
    """Non-finite weights are refused by every kernel that reads them (kWeightNotFinite, also on
    an untargeted class and with eps = 0); weights whose sum overflows float32 (1e37 each) and
    denormal weights give finite, correct values."""
    n, c = 4, 100
    x = rng.standard_normal((n, c)) * 2
    t = np.array([1, 2, 3, 4])
    soft_t = np.full((n, c), 1.0 / c)
    shift, ones = (np.zeros(n), np.zeros(n)), np.ones(n)
    for bad in (np.inf, -np.inf, np.nan):
        w = np.ones(c)
        w[50] = bad
        for eps in (0.0, 0.1):
            attrs = dict(CE_ATTRS[1], label_smoothing=eps)
            what = f"weight[50] = {bad} eps={eps}"
            hard_forward(kernels, "float32", x, t, w, attrs, WEIGHT_NOT_FINITE, what=what)
            hard_backward(kernels, "float32", x, t, w, shift, ones, ones, attrs, WEIGHT_NOT_FINITE,
                          what=what)
            soft_forward(kernels, "float32", x, soft_t, w, attrs, WEIGHT_NOT_FINITE, what=what)
            soft_backward(kernels, "float32", x, soft_t, w, shift, ones, ones, attrs,
                          WEIGHT_NOT_FINITE, with_target=True, what=what)
    for w in (np.full(c, 1e37), np.full(c, 1e-40), np.where(np.arange(c) % 2, -1.0, 2.0)):
        for eps in (0.0, 0.1):
            attrs = dict(CE_ATTRS[1], label_smoothing=eps, logit_scale=1.0)
            what = f"weights {w[:2]} eps={eps}"
            got = hard_forward(kernels, "float32", x, t, w, attrs, what=what)
            want = ce_reference(x, t, w, attrs, ones, ones * 0.5)
            # Denormal weights: (eps/C) w[c] has few significant bits left.
            rtol = 1e-2 if w[0] < 1e-38 and eps > 0 else 1e-5
            report_error(kernels, "weighted loss", got["loss"], want["loss"], rtol, 0, what)
            grad = hard_backward(kernels, "float32", x, t, w, (got["row_max"], got["row_log_sum"]),
                                 ones, ones * 0.5, attrs, what=what)
            report_error(kernels, "weighted grad", grad, want["grad"], 0,
                         1e-6 * np.abs(want["grad"]).max(), what)


# ---- binary cross-entropy with logits ----------------------------------------------------------

BCE_SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (4, 0, 3), (40001,), (3, 17, 700),
              (2,) * 15 + (3,)]


def broadcast_shapes(rng, shape):
    """A few shapes that broadcast to ``shape``: scalar, same, trailing dims, size-1 dims."""
    candidates = [(), tuple(shape)]
    if shape:
        candidates.append(tuple(shape[-1:]))
        candidates.append(tuple(1 if rng.random() < 0.5 else d for d in shape))
        candidates.append((1,) + tuple(shape[1:]))
    return candidates


def bce_values(rng, count, dtype):
    x = rng.standard_normal(count) * 10
    specials = [-120.0, 120.0, np.inf, -np.inf, np.nan, 0.0, FLT_MAX, -FLT_MAX, 1e-45]
    if dtype == "float16":
        specials += [65504.0, -65504.0]
    picks = rng.random(count) < 0.3
    x[picks] = rng.choice(specials, int(picks.sum()))
    t = rng.choice([0.0, 1.0, 0.3, 0.999], count)
    t[rng.random(count) < 0.02] = np.nan
    return x, t


def run_bce(kernels, rng):
    for dtype, shape in itertools.product(FLOAT_DTYPES, BCE_SHAPES):
        count = int(np.prod(shape, dtype=np.int64))
        x, t = bce_values(rng, count, dtype)
        for w_shape, pw_shape in itertools.product(broadcast_shapes(rng, shape), repeat=2):
            if rng.random() < 0.6:
                continue
            w = rng.random(int(np.prod(w_shape, dtype=np.int64))) * 2
            pw = rng.choice([0.0, 1.0, 3.0, 1e4], int(np.prod(pw_shape, dtype=np.int64)))
            what = f"{dtype} x{shape} w{w_shape} pw{pw_shape}"
            inputs = [Tensor(dtype, shape, x), Tensor(dtype, shape, t),
                      Tensor("float32", w_shape, w), Tensor("float32", pw_shape, pw)]
            kernels.call("BceWithLogitsForward", inputs + [Tensor(dtype, shape)], OK, None, what)
            kernels.call("BceWithLogitsForwardSum", inputs + [Tensor("float32", (1,))], OK, None,
                         what)
            grad = rng.choice([1.0, -2.0, 0.0, np.nan], count)
            kernels.call("BceWithLogitsBackward",
                         inputs + [Tensor(dtype, shape, grad), Tensor(dtype, shape),
                                   Tensor(dtype, shape)], OK, None, what + " backward")
            kernels.call("BceWithLogitsBackwardScalarGrad",
                         inputs + [Tensor("float32", (1,), [0.5]), Tensor(dtype, shape),
                                   Tensor(dtype, shape)], OK, None, what + " backward scalar")
    run_bce_canaries(kernels, rng)
    run_bce_malformed(kernels)


def run_bce_canaries(kernels, rng):
    """The BCE kernels on finite inputs with canary-padded buffers (see Kernels.call)."""
    for dtype, shape in itertools.product(FLOAT_DTYPES, [(1,), (15,), (17,), (3, 33), (40001,)]):
        what = f"canary {dtype} x{shape}"
        x, t = rng.standard_normal(shape) * 5, rng.random(shape)
        inputs = [Tensor(dtype, shape, x), Tensor(dtype, shape, t),
                  Tensor("float32", shape[-1:], rng.random(shape[-1:])),
                  Tensor("float32", (), [2.0])]
        for symbol, outputs in (
                ("BceWithLogitsForward", [Tensor(dtype, shape)]),
                ("BceWithLogitsForwardSum", [Tensor("float32", (1,))]),
                ("BceWithLogitsBackward", [Tensor(dtype, shape, np.ones(shape)),
                                           Tensor(dtype, shape), Tensor(dtype, shape)]),
                ("BceWithLogitsBackwardScalarGrad", [Tensor("float32", (1,), [1.0]),
                                                     Tensor(dtype, shape), Tensor(dtype, shape)])):
            out = kernels.call(symbol, inputs + outputs, OK, None, what, canary=True)
            check_finite(kernels, symbol, out[4:], what)


def run_bce_malformed(kernels):
    f32 = "float32"
    shape = (3, 4)

    def forward(x=shape, t=shape, w=(), pw=(), out=shape, w_dtype=f32, t_dtype=f32):
        return [Tensor(f32, x), Tensor(t_dtype, t), Tensor(w_dtype, w), Tensor(f32, pw),
                Tensor(f32, out)]

    rank17 = (1,) * 17
    cases = [
        ("BceWithLogitsForward", forward(t=(4, 3))), ("BceWithLogitsForward", forward(w=(5,))),
        ("BceWithLogitsForward", forward(pw=(2, 3, 4))), ("BceWithLogitsForward", forward(w=(3,))),
        ("BceWithLogitsForward", forward(out=(12,))),
        ("BceWithLogitsForward", forward(w_dtype="float16")),
        ("BceWithLogitsForward", forward(t_dtype="float16")),
        ("BceWithLogitsForward", forward(x=rank17, t=rank17, out=rank17)),
        ("BceWithLogitsForward", forward()[:4]),
        ("BceWithLogitsForwardSum", forward()[:4] + [Tensor(f32, (2,))]),
        ("BceWithLogitsForwardSum", forward()[:4] + [Tensor("float16", (1,))]),
        ("BceWithLogitsBackward", forward()[:4] + [Tensor(f32, (4, 3)), Tensor(f32, shape),
                                                   Tensor(f32, shape)]),
        ("BceWithLogitsBackward", forward()[:4] + [Tensor(f32, shape), Tensor(f32, shape)]),
        ("BceWithLogitsBackward", forward()[:4] + [Tensor(f32, shape), Tensor(f32, shape),
                                                   Tensor(f32, (12,))]),
        ("BceWithLogitsBackwardScalarGrad", forward()[:4] + [Tensor(f32, (2,)), Tensor(f32, shape),
                                                             Tensor(f32, shape)]),
    ]
    for symbol, tensors in cases:
        shapes = [(t.dtype, t.shape) for t in tensors]
        kernels.call(symbol, tensors, BAD_ARGUMENTS, None, f"malformed {shapes}")


# ---- build and run ------------------------------------------------------------------------------

def build(kernel_build):
    """(kernel library, test-only AotExtra library), both with the sanitizer flags."""
    flags = kernel_build.build_flags()
    if not any(flag.startswith("-fsanitize=") for flag in flags):
        sys.exit("run_kernels.py: MS_XENT_EXTRA_CXXFLAGS has no -fsanitize flag; use "
                 "tests/sanitizers/run.sh")
    kernel_library = kernel_build.kernel_library()
    extra_library = os.path.join(os.path.dirname(kernel_library), "libms_xent_test_extra.so")
    source = os.path.join(HERE, "fake_aot_extra.cc")
    if (not os.path.exists(extra_library)
            or os.path.getmtime(extra_library) < os.path.getmtime(source)):
        command = [kernel_build._compiler(), *flags, "-I", kernel_build.CSRC_DIR, source, "-o",
                   extra_library]
        subprocess.run(command, check=True)
    for library in (kernel_library, extra_library):
        with open(library, "rb") as binary:
            content = binary.read()
        if b"__asan_" not in content or b"__ubsan_handle" not in content:
            sys.exit(f"run_kernels.py: {library} is not instrumented with ASan and UBSan")
    return kernel_library, extra_library


# ---- fused linear + cross-entropy ----------------------------------------------------------------

# (N, H, V, row_block): blocks of 1 row, blocks that do not divide N, one block, a block above N.
LINEAR_SHAPES = [(1, 1, 1, 1), (3, 5, 7, 2), (13, 8, 37, 5), (17, 33, 129, 16), (40, 16, 9, 40),
                 (5, 7, 11, 64), (70, 24, 300, 37), (257, 40, 1000, 129)]
LINEAR_OPTIONS = [
    {"ignore_index": -100, "label_smoothing": 0.0, "weighted": False, "has_bias": False,
     "logit_softcap": 0.0, "logit_scale": 1.0},
    {"ignore_index": -1, "label_smoothing": 0.1, "weighted": True, "has_bias": True,
     "logit_softcap": 0.0, "logit_scale": 0.5},
    {"ignore_index": 2, "label_smoothing": 0.3, "weighted": False, "has_bias": True,
     "logit_softcap": 4.0, "logit_scale": -1.5},
]


def onednn_library():
    """mindspore/lib/libdnnl.so.3, found without importing MindSpore."""
    spec = importlib.util.find_spec("mindspore")
    return os.path.join(os.path.dirname(spec.origin), "lib", "libdnnl.so.3")


def linear_reference(hidden, weight, bias, target, class_weight, row_coef, z_coef, options):
    """float64 numpy: (value [N], lse [N], d sum(value) / d hidden, / d weight, / d bias)."""
    scale, cap, eps = options["logit_scale"], options["logit_softcap"], options["label_smoothing"]
    z = scale * (hidden @ weight.T + (bias if options["has_bias"] else 0.0))
    x = cap * np.tanh(z / cap) if cap > 0 else z
    lse = np.logaddexp.reduce(x, axis=1)
    log_p = x - lse[:, None]
    w = class_weight if options["weighted"] else np.ones(weight.shape[0])
    counted = target != options["ignore_index"]
    safe = np.where(counted, target, 0)
    rows = np.arange(len(target))
    loss = counted * (-(1 - eps) * w[safe] * log_p[rows, safe]
                      - eps / weight.shape[0] * (w * log_p).sum(1))
    value = row_coef * loss + z_coef * lse ** 2
    p = np.exp(log_p)
    a = row_coef * counted
    grad_x = (p * (a * ((1 - eps) * w[safe] + eps / weight.shape[0] * w.sum()))[:, None]
              - (a * eps / weight.shape[0])[:, None] * w + (2 * z_coef * lse)[:, None] * p)
    grad_x[rows[counted], safe[counted]] -= (a * (1 - eps) * w[safe])[counted]
    grad_z = grad_x * (1 - (x / cap) ** 2) if cap > 0 else grad_x
    return (value, lse, scale * grad_z @ weight, scale * grad_z.T @ hidden,
            scale * grad_z.sum(0))


def rounded_to(dtype, values):
    """values as the kernel sees them in ``dtype``, in float64."""
    if dtype == "bfloat16":
        bits = to_bfloat16_bits(values).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(values).astype(NUMPY_TYPES[dtype]).astype(np.float64)


def run_linear_cross_entropy(kernels, rng):
    """XentLinearRows / XentLinearSumGrad over every dtype, row blocks that do and do not divide
    N, every option, ignored and out-of-range targets (canary-padded buffers; finite outputs
    checked against a float64 reference), N = 0, non-finite hidden states, and malformed calls."""
    tolerance = {"float32": 2e-4, "bfloat16": 5e-2, "float16": 5e-3}
    for number, (dtype, (n, h, v, block)) in enumerate(itertools.product(FLOAT_DTYPES,
                                                                         LINEAR_SHAPES)):
        options = LINEAR_OPTIONS[number % len(LINEAR_OPTIONS)]
        attrs = dict(options, row_block=block, gemm_library=onednn_library())
        what = f"linear {dtype} N={n} H={h} V={v} block={block} {options}"
        hidden = rng.standard_normal((n, h))
        weight = rng.standard_normal((v, h)) * 2 / np.sqrt(h)
        bias = rng.standard_normal(v)
        target = rng.integers(0, v, n)
        target[rng.random(n) < 0.2] = options["ignore_index"]
        class_weight = rng.random(v) + 0.25
        row_coef = rng.choice([0.0, 1.0, 0.5], n)
        z_coef = rng.choice([0.0, 1e-3], n)
        inputs = [Tensor(dtype, (n, h), hidden), Tensor(dtype, (v, h), weight),
                  Tensor(dtype, (v,), bias), Tensor("int64", (n,), target),
                  Tensor("float32", (v,), class_weight), Tensor("float32", (n,), row_coef),
                  Tensor("float32", (n,), z_coef)]
        rows, rows_lse = kernels.call(
            "XentLinearRows", inputs + [Tensor("float32", (n,)), Tensor("float32", (n,))], OK,
            attrs, what, canary=True)[-2:]
        outputs = kernels.call("XentLinearSumGrad",
                               inputs + [Tensor("float32", (1,)), Tensor("float32", (n,)),
                                         Tensor(dtype, (n, h)), Tensor(dtype, (v, h)),
                                         Tensor(dtype, (v,))],
                               OK, attrs, what, canary=True)[-5:]
        check_finite(kernels, "XentLinearSumGrad", [rows, rows_lse] + outputs, what)
        value, lse, *grads = linear_reference(
            rounded_to(dtype, hidden), rounded_to(dtype, weight), rounded_to(dtype, bias),
            target, class_weight, row_coef, z_coef, options)
        for name, got, want in (("value", rows, value), ("lse", rows_lse, lse),
                                ("total", outputs[0], [value.sum()]), ("lse", outputs[1], lse),
                                ("grad_hidden", outputs[2], grads[0]),
                                ("grad_weight", outputs[3], grads[1]),
                                ("grad_bias", outputs[4], grads[2] * options["has_bias"])):
            error = np.abs(np.asarray(got) - want).max(initial=0.0)
            peak = np.abs(want).max(initial=0.0)
            if error > tolerance[dtype] * (1.0 + peak):
                kernels.failures.append(f"{name}: max error {error:.3g} (peak {peak:.3g}) ({what})")
        bad = target.copy()
        if n:
            bad[0] = v
            kernels.call("XentLinearSumGrad",
                         inputs[:3] + [Tensor("int64", (n,), bad)] + inputs[4:]
                         + [Tensor("float32", (1,)), Tensor("float32", (n,)),
                            Tensor(dtype, (n, h)), Tensor(dtype, (v, h)), Tensor(dtype, (v,))],
                         TARGET_OUT_OF_RANGE, attrs, what + " bad target")
    run_linear_cross_entropy_edges(kernels, rng)
    run_linear_cross_entropy_extremes(kernels, rng)


def run_linear_cross_entropy_edges(kernels, rng):
    """N = 0; hidden states with inf / NaN; no AotExtra (the matrix-product library is then not
    loaded: kBadArguments); malformed calls."""
    attrs = dict(LINEAR_OPTIONS[2], row_block=3, gemm_library=onednn_library())
    n, h, v = 4, 6, 10

    def call(symbol, hidden_shape=(n, h), weight_shape=(v, h), bias=(v,), target=(n,),
             coef=(n,), outputs=None, expected=OK, extra=attrs, values=None, what=""):
        hidden = values if values is not None else rng.standard_normal(hidden_shape)
        tensors = [Tensor("float32", hidden_shape, hidden),
                   Tensor("float32", weight_shape, rng.standard_normal(weight_shape)),
                   Tensor("float32", bias), Tensor("int64", target, np.zeros(target)),
                   Tensor("float32", (weight_shape[0],), np.ones(weight_shape[0])),
                   Tensor("float32", coef, np.ones(coef)), Tensor("float32", coef, np.ones(coef))]
        if outputs is None:
            lse = Tensor("float32", (hidden_shape[0],))
            outputs = ([Tensor("float32", (hidden_shape[0],)), lse] if symbol == "XentLinearRows"
                       else [Tensor("float32", (1,)), lse, Tensor("float32", hidden_shape),
                             Tensor("float32", weight_shape), Tensor("float32", bias)])
        return kernels.call(symbol, tensors + outputs, expected, extra, "linear edge " + what)

    for symbol in ("XentLinearRows", "XentLinearSumGrad"):
        call(symbol, (0, h), target=(0,), coef=(0,), what="N=0")
        special = rng.standard_normal((n, h))
        special[0, 0], special[1, 2], special[2, :] = np.inf, np.nan, -np.inf
        call(symbol, values=special, what="non-finite hidden")
        call(symbol, expected=BAD_ARGUMENTS, extra=None, what="no AotExtra")
        call(symbol, weight_shape=(v, h + 1), bias=(v,), expected=BAD_ARGUMENTS,
             what="weight columns")
        call(symbol, bias=(v + 1,), expected=BAD_ARGUMENTS, what="bias length")
        call(symbol, target=(n + 1,), expected=BAD_ARGUMENTS, what="target length")
        call(symbol, weight_shape=(0, h), bias=(0,), expected=BAD_ARGUMENTS, what="V=0")
        call(symbol, outputs=[], expected=BAD_ARGUMENTS, what="parameter count")


def run_linear_cross_entropy_extremes(kernels, rng):
    """Logits offset by a bias of 1e6, 1e30 and 3e38 (finite) and confident rows (p_y = 1 - 1e-7)
    against float64: loss relative error <= 1e-5 and logit-gradient error <= 1e-6 of the row's
    peak. hidden = I and weight = c I make the logits c I + bias exactly in float32 and
    d hidden = s g W = c g, so the logit gradient g is read back exactly."""
    n = v = 24
    confident = -np.log(1e-7 / (v - 1))  # the target's logit: p_y = 1 / (1 + 1e-7)
    cases = {"offset 1e6": (1.0, 1e6 + 0.0625 * np.arange(v)),  # exact in float32
             "offset 1e30": (1.0, np.full(v, 1e30)), "offset 3e38": (1.0, np.full(v, 3e38)),
             "confident": (confident, np.zeros(v))}
    attrs = dict(LINEAR_OPTIONS[0], has_bias=True, row_block=7, gemm_library=onednn_library())
    target = np.arange(n)
    for what, (c, bias) in cases.items():
        hidden, weight = np.eye(n), c * np.eye(v)
        x = (hidden @ weight.T + bias).astype(np.float32).astype(np.float64)
        # float64 about each row's max (lse itself would absorb log 24 at 1e30)
        shifted = x - x.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=1))
        want_loss = log_sum - shifted[target, target]
        want_grad = np.exp(shifted - log_sum[:, None])
        want_grad[target, target] = np.expm1(-want_loss)  # -(1 - p_y)
        inputs = [Tensor("float32", (n, v), hidden), Tensor("float32", (v, v), weight),
                  Tensor("float32", (v,), bias), Tensor("int64", (n,), target),
                  Tensor("float32", (v,), np.ones(v)), Tensor("float32", (n,), np.ones(n)),
                  Tensor("float32", (n,), np.zeros(n))]
        value = kernels.call("XentLinearRows",
                             inputs + [Tensor("float32", (n,)), Tensor("float32", (n,))], OK,
                             attrs, "linear extreme " + what)[-2]
        grad_hidden = kernels.call(
            "XentLinearSumGrad", inputs + [Tensor("float32", (1,)), Tensor("float32", (n,)),
                                           Tensor("float32", (n, v)), Tensor("float32", (v, v)),
                                           Tensor("float32", (v,))],
            OK, attrs, "linear extreme " + what)[-3]
        loss_error = np.abs(np.asarray(value) / want_loss - 1).max()
        grad_error = (np.abs(np.asarray(grad_hidden) / c - want_grad).max(axis=1)
                      / np.abs(want_grad).max(axis=1)).max()
        if not loss_error <= 1e-5 or not grad_error <= 1e-6:
            kernels.failures.append(f"linear extreme {what}: loss relative error {loss_error:.3g}, "
                                    f"gradient error {grad_error:.3g} of the row's peak")


def main():
    kernel_library, extra_library = build(load_kernel_build())
    print(f"sanitized kernels: {kernel_library}", flush=True)
    kernels = Kernels(kernel_library, extra_library)
    rng = np.random.default_rng(20240601)
    run_cross_entropy(kernels, rng)
    ce_calls = kernels.calls
    run_bce(kernels, rng)
    bce_calls = kernels.calls - ce_calls
    run_linear_cross_entropy(kernels, rng)
    print(f"kernel calls: {kernels.calls} (cross-entropy {ce_calls}, BCE {bce_calls}, "
          f"linear cross-entropy {kernels.calls - ce_calls - bce_calls}); "
          f"failures: {len(kernels.failures)}")
    for failure in kernels.failures[:50]:
        print("  " + failure)
    return 1 if kernels.failures else 0


if __name__ == "__main__":
    sys.exit(main())
