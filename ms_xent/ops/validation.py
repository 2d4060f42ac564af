"""Argument checks shared by the functional APIs and the Cells.

Static checks (ranks, shapes, dtypes, option values) run on shapes and dtypes, which are
constants in both PyNative and GRAPH mode: they are ``constexpr`` functions, so in graph mode a
bad argument fails at compile time with the same message. Checks that need tensor values
(targets in range, finite weights) and the type of the arguments (a ``mindspore.Tensor``, not a
numpy array or a list) run only when executing eagerly; in graph mode the CPU kernels check the
targets and the weights themselves and never index with an out-of-range value. The composed
backend has no such run-time check in GRAPH mode (MindSpore offers no in-graph assertion on
CPU): there a non-finite class weight makes the results that use it inf / NaN, never a finite
wrong value.

A dynamic rank (``Tensor(shape=None)``; its shape is None at compile time) raises a clear error
in the cross-entropy APIs, which lay the logits out as [N, C]; BCE is element-wise and runs.

GRAPH mode: an argument error raised while a graph compiles (every static check above) makes
MindSpore write ``rank_0/om/analyze_fail.ir`` into the working directory, as for any compile
error; only the ``MS_OM_PATH`` environment variable moves it, and ms_xent does not change the
user's environment. Errors raised eagerly (PyNative) write nothing.
"""

import difflib
import inspect
import numbers

import numpy as np
import mindspore as ms
from mindspore.ops import constexpr

from ms_xent._backends._mindspore import executing_eagerly, known
from ms_xent._backends.ascend.vendor_op import BCE_REDUCTION_CODES

FLOAT_TYPES = (ms.float32, ms.float16, ms.bfloat16)
INDEX_TYPES = (ms.int32, ms.int64)
REDUCTIONS = ("mean", "sum", "none")
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
SUPPORTED_FLOATS = "float16, bfloat16 or float32"


def check_tensors(api, names, values):
    """Eager-only (call it under ``executing_eagerly()``): every value given (not None) is a
    ``mindspore.Tensor``.

    A numpy array or a list would otherwise fail further on with a misleading message (a numpy
    float32 is not ``mindspore.float32``; a list has no ``shape``). In GRAPH mode MindSpore
    converts a Cell's array inputs to tensors before ms_xent sees them.
    """
    for name, value in zip(names, values):
        if value is not None and not isinstance(value, ms.Tensor):
            kind = type(value)
            kind = kind.__qualname__ if kind.__module__ == "builtins" else (
                f"{kind.__module__}.{kind.__qualname__}")
            raise TypeError(f"{api}: `{name}` must be a mindspore.Tensor, got {kind} (convert it "
                            f"with mindspore.Tensor(...))")


def rank_of(api, name, shape):
    """len(shape); a clear error for a dynamic rank (``Tensor(shape=None)``: the shape is None
    at compile time), which ms_xent's ops cannot lay out."""
    if shape is None or any(d == -2 for d in shape):
        raise ValueError(f"{api}: `{name}` has a dynamic rank (Tensor(shape=None)); ms_xent needs "
                         f"the rank at compile time: declare the dims as unknown instead, e.g. "
                         f"Tensor(shape=[None, None], dtype=...)")
    return len(shape)


def check_keywords(api, function, given):
    """Keyword arguments a Cell's ``**kwargs`` caught: TypeError naming the first unknown one and
    the closest parameter of ``function`` (a misspelled option must not train silently without
    it). MindFormers passes its loss Cells only parameters they declare."""
    if not given:
        return
    accepted = [name for name, parameter in inspect.signature(function).parameters.items()
                if name != "self" and parameter.kind != parameter.VAR_KEYWORD]
    name = sorted(given)[0]
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    raise TypeError(f"{api}: unexpected keyword argument `{name}`{hint} (accepted: "
                    f"{', '.join(accepted)})")


@constexpr
def check_float_input(api, name, shape, dtype, rank=None):
    if dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `{name}` must be {SUPPORTED_FLOATS}, got {dtype}")
    if rank is not None and rank_of(api, name, shape) != rank:
        raise ValueError(f"{api}: `{name}` must be {rank}-D, got shape {tuple(shape)}")
    return True


@constexpr
def check_option_values(api, reduction, label_smoothing, zloss_scale):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{api}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in (("label_smoothing", label_smoothing),
                        ("lse_square_scale_for_zloss", zloss_scale)):
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{api}: `{name}` must be a float in [0, 1), got {value!r}")
    if isinstance(label_smoothing, bool) or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"{api}: `label_smoothing` must be in [0, 1), got {label_smoothing!r}")
    if isinstance(zloss_scale, bool) or not 0.0 <= float(zloss_scale) < 1.0:
        raise ValueError(
            f"{api}: `lse_square_scale_for_zloss` must be in [0, 1), got {zloss_scale!r}")
    return True


@constexpr
def check_zloss_scale(api, zloss_scale):
    """Any finite z-loss scale s >= 0: the entry points other than the vendor-signature op (whose
    [0, 1) range is the vendor's contract, see :func:`check_option_values`)."""
    if isinstance(zloss_scale, bool) or not isinstance(zloss_scale, numbers.Real):
        raise TypeError(f"{api}: `lse_square_scale_for_zloss` must be a float >= 0, got "
                        f"{zloss_scale!r}")
    if not (np.isfinite(zloss_scale) and zloss_scale >= 0):
        raise ValueError(f"{api}: `lse_square_scale_for_zloss` must be finite and >= 0, got "
                         f"{zloss_scale!r}")
    return True


@constexpr
def check_ignore_index(api, ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"{api}: `ignore_index` must be an int, got {ignore_index!r}")
    if not INT64_MIN <= int(ignore_index) <= INT64_MAX:
        raise ValueError(f"{api}: `ignore_index` must fit in int64 [{INT64_MIN}, {INT64_MAX}], "
                         f"got {ignore_index!r}")
    return True


@constexpr
def check_logits_and_target(api, input_shape, input_dtype, target_shape, target_dtype,
                            input_name="input"):
    """Returns True for probability targets [N, C], False for class indices [N].

    ``input_name`` is the caller's name of the [N, C] argument (``log_prob`` for the grad op).
    """
    check_float_input(api, input_name, input_shape, input_dtype, rank=2)
    n_rows, n_classes = input_shape
    if known(n_classes) and n_classes <= 0:
        raise ValueError(f"{api}: `{input_name}` must have C > 0 classes, got shape "
                         f"{tuple(input_shape)}")
    target_rank = rank_of(api, "target", target_shape)
    soft = target_dtype in FLOAT_TYPES
    if soft:
        if tuple(target_shape) != tuple(input_shape) and all(known(d) for d in target_shape):
            raise ValueError(f"{api}: probability `target` must have the shape of `{input_name}` "
                             f"{tuple(input_shape)}, got {tuple(target_shape)}")
        return True
    if target_dtype not in INDEX_TYPES:
        raise TypeError(f"{api}: `target` must be int32 or int64 class indices (or "
                        f"{SUPPORTED_FLOATS} probabilities), got {target_dtype}")
    if target_rank != 1:
        raise ValueError(f"{api}: `target` must be 1-D [N], got shape {tuple(target_shape)}")
    if known(n_rows) and known(target_shape[0]) and target_shape[0] != n_rows:
        raise ValueError(f"{api}: `target` has {target_shape[0]} rows but `{input_name}` has "
                         f"{n_rows}")
    return False


@constexpr
def check_weight(api, weight_shape, weight_dtype, n_classes):
    if weight_dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `weight` must be {SUPPORTED_FLOATS}, got {weight_dtype}")
    if rank_of(api, "weight", weight_shape) != 1 or (known(n_classes) and weight_shape[0] != n_classes):
        raise ValueError(f"{api}: `weight` must have shape ({n_classes},) (one per class), got "
                         f"{tuple(weight_shape)}")
    return True


def check_target_values(api, target, n_classes, ignore_index):
    """Eager-only: every class index is in [0, C) or equals ignore_index."""
    values = target.asnumpy()
    bad = (values != ignore_index) & ((values < 0) | (values >= n_classes))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{api}: `target` value {int(values[position])} at position {position} "
                         f"is outside [0, {n_classes}) and is not ignore_index ({ignore_index})")


def check_weight_values(api, weight, name="weight"):
    """Eager-only: class weights are finite as float32 (any sign: PyTorch semantics). The kernels
    refuse non-finite weights themselves in GRAPH mode."""
    values = weight.astype(ms.float32).asnumpy()
    bad = ~np.isfinite(values)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{api}: `{name}` must be finite, got {values[position]} at class "
                         f"{position}")


def class_weight(api, weight, n_classes):
    """``weight`` checked and as float32 [C], or None."""
    if weight is None:
        return None
    if executing_eagerly():
        check_tensors(api, ("weight",), (weight,))
    check_weight(api, weight.shape, weight.dtype, n_classes)
    if executing_eagerly():
        check_weight_values(api, weight)
    return weight.astype(ms.float32)


@constexpr
def check_logit_map(api, logit_softcap, logit_scale):
    """``logit_softcap`` >= 0 (0: none) and ``logit_scale`` != 0, both finite Python numbers."""
    for name, value in (("logit_softcap", logit_softcap), ("logit_scale", logit_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not np.isfinite(value):
            raise TypeError(f"{api}: `{name}` must be a finite float, got {value!r}")
    if logit_softcap < 0:
        raise ValueError(f"{api}: `logit_softcap` must be >= 0 (0 disables it), got "
                         f"{logit_softcap!r}")
    if logit_scale == 0:
        raise ValueError(f"{api}: `logit_scale` must be non-zero, got {logit_scale!r}")
    return True


@constexpr
def check_ignore_index_for_probabilities(api, ignore_index, soft):
    """Probability targets have no ignored rows: a class-index ``ignore_index`` (>= 0) with them
    is refused, as PyTorch does (a negative one, e.g. the default -100, is never a class and
    passes)."""
    if soft and ignore_index >= 0:
        raise ValueError(f"{api}: `ignore_index` ({ignore_index}) does not apply to probability "
                         f"targets (every row counts); leave it negative (default -100) or pass "
                         f"class indices")
    return True


def validate_logits_and_target(api, logits, target, ignore_index, logits_name="input"):
    """Static checks; eager value checks. Returns True for probability targets."""
    if executing_eagerly():
        check_tensors(api, (logits_name, "target"), (logits, target))
    soft = check_logits_and_target(api, logits.shape, logits.dtype, target.shape, target.dtype,
                                   logits_name)
    check_ignore_index(api, ignore_index)
    check_ignore_index_for_probabilities(api, ignore_index, soft)
    if not soft and executing_eagerly():
        check_target_values(api, target, logits.shape[1], ignore_index)
    return soft


# ---- binary_cross_entropy_with_logits ----------------------------------------------------------

def _unknown_rank(shape):
    return shape is None or any(d == -2 for d in shape)


@constexpr
def bce_reduction(api, reduction):
    """The reduction name for a name or the vendor's integer code (0 none, 1 mean, 2 sum)."""
    if isinstance(reduction, str) and reduction in REDUCTIONS:
        return reduction
    if (isinstance(reduction, (int, np.integer)) and not isinstance(reduction, bool)
            and int(reduction) in BCE_REDUCTION_CODES):
        return BCE_REDUCTION_CODES[int(reduction)]
    raise ValueError(f"{api}: `reduction` must be one of {REDUCTIONS} or an integer code "
                     f"0 (none), 1 (mean), 2 (sum), got {reduction!r}")


@constexpr
def check_bce_input_and_target(api, input_shape, input_dtype, target_shape, target_dtype):
    check_float_input(api, "input", input_shape, input_dtype)
    if target_dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `target` must be {SUPPORTED_FLOATS} (probabilities in [0, 1]), "
                        f"got {target_dtype}")
    if _unknown_rank(input_shape) or _unknown_rank(target_shape):
        return True
    same = len(input_shape) == len(target_shape) and all(
        a == b or not known(a) or not known(b) for a, b in zip(input_shape, target_shape))
    if not same:
        raise ValueError(f"{api}: `target` must have the shape of `input` {tuple(input_shape)}, "
                         f"got {tuple(target_shape)}")
    return True


@constexpr
def check_broadcastable_to(api, name, shape, dtype, target_shape):
    """`name` (weight / pos_weight) is a float tensor that broadcasts to `target_shape`."""
    if dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `{name}` must be {SUPPORTED_FLOATS}, got {dtype}")
    if _unknown_rank(shape) or _unknown_rank(target_shape):
        return True
    fits = len(shape) <= len(target_shape) and all(
        d == 1 or d == t or not known(d) or not known(t)
        for d, t in zip(reversed(shape), reversed(target_shape)))
    if not fits:
        raise ValueError(f"{api}: `{name}` of shape {tuple(shape)} cannot be broadcast to the "
                         f"shape of `target` {tuple(target_shape)} (dims are right-aligned; each "
                         "must be 1 or equal)")
    return True


def check_non_negative_values(api, name, tensor):
    """Eager-only: every entry of `name` is >= 0 (NaN is let through to the loss)."""
    values = tensor.astype(ms.float32).asnumpy()
    if (values < 0).any():
        raise ValueError(f"{api}: `{name}` must be non-negative, got min {values.min()}")
