"""Argument checks shared by the functional APIs.

Static checks (ranks, shapes, dtypes, option values) run on shapes and dtypes, which are
constants in both PyNative and GRAPH mode: they are ``constexpr`` functions, so in graph mode a
bad argument fails at compile time with the same message. Checks that need tensor values
(targets in range, non-negative weights) run only when executing eagerly; in graph mode the
kernels check the targets themselves and never index with an out-of-range value.
"""

import numpy as np
import mindspore as ms
from mindspore.ops import constexpr
from mindspore.ops._primitive_cache import _is_need_compile

FLOAT_TYPES = (ms.float32, ms.float16, ms.bfloat16)
INDEX_TYPES = (ms.int32, ms.int64)
REDUCTIONS = ("mean", "sum", "none")


def _known(dim):
    return dim is not None and dim >= 0


def _placeholder():
    return 0


def executing_eagerly():
    """True in PyNative execution, False while a graph (GRAPH_MODE, ms.jit) is being compiled."""
    return not _is_need_compile(_placeholder)


@constexpr
def check_float_input(api, name, shape, dtype, rank=None):
    if dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `{name}` must be float16, bfloat16 or float32, got {dtype}")
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{api}: `{name}` must be {rank}-D, got shape {tuple(shape)}")
    return True


@constexpr
def check_option_values(api, reduction, label_smoothing, zloss_scale):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{api}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"{api}: `label_smoothing` must be in [0, 1), got {label_smoothing!r}")
    if isinstance(zloss_scale, bool) or not 0.0 <= float(zloss_scale) < 1.0:
        raise ValueError(
            f"{api}: `lse_square_scale_for_zloss` must be in [0, 1), got {zloss_scale!r}")
    return True


@constexpr
def check_ignore_index(api, ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"{api}: `ignore_index` must be an int, got {ignore_index!r}")
    return True


@constexpr
def check_logits_and_target(api, input_shape, input_dtype, target_shape, target_dtype):
    """Returns True for probability targets [N, C], False for class indices [N]."""
    check_float_input(api, "input", input_shape, input_dtype, rank=2)
    n_rows, n_classes = input_shape
    if _known(n_classes) and n_classes <= 0:
        raise ValueError(f"{api}: `input` must have C > 0 classes, got shape {tuple(input_shape)}")
    soft = target_dtype in FLOAT_TYPES
    if soft:
        if tuple(target_shape) != tuple(input_shape) and all(_known(d) for d in target_shape):
            raise ValueError(f"{api}: probability `target` must have the shape of `input` "
                             f"{tuple(input_shape)}, got {tuple(target_shape)}")
        return True
    if target_dtype not in INDEX_TYPES:
        raise TypeError(f"{api}: `target` must be int32 or int64 class indices (or float "
                        f"probabilities), got {target_dtype}")
    if len(target_shape) != 1:
        raise ValueError(f"{api}: `target` must be 1-D [N], got shape {tuple(target_shape)}")
    if _known(n_rows) and _known(target_shape[0]) and target_shape[0] != n_rows:
        raise ValueError(f"{api}: `target` has {target_shape[0]} rows but `input` has {n_rows}")
    return False


@constexpr
def check_weight(api, weight_shape, weight_dtype, n_classes):
    if weight_dtype not in FLOAT_TYPES:
        raise TypeError(f"{api}: `weight` must be a float tensor, got {weight_dtype}")
    if len(weight_shape) != 1 or (_known(n_classes) and weight_shape[0] != n_classes):
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


def check_weight_values(api, weight):
    """Eager-only: class weights are non-negative."""
    values = weight.asnumpy().astype(np.float64)
    if (values < 0).any():
        raise ValueError(f"{api}: `weight` must be non-negative, got min {values.min()}")
