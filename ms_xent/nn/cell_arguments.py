"""Constructor-argument checks shared by the MindFormers-style loss Cells (CrossEntropyLoss,
LinearCrossEntropyLoss): each error names the Cell (``api``) and the argument."""

from collections.abc import Mapping

import numpy as np
import mindspore as ms


def _parallel_degree(parallel_config, name, api):
    """``parallel_config.<name>`` read from an object or a mapping; 1 when absent."""
    if isinstance(parallel_config, Mapping):
        value = parallel_config.get(name)
    else:
        value = getattr(parallel_config, name, None)
    return 1 if value is None else check_positive_int(f"parallel_config.{name}", value, api)


def parallel_degrees(parallel_config, api):
    """(data_parallel, model_parallel) from an OpParallelConfig, TransformerOpParallelConfig,
    MindFormerConfig, plain dict or None (meaning 1, 1), read by duck typing."""
    if parallel_config is None:
        return 1, 1
    names = ("data_parallel", "model_parallel")
    if not isinstance(parallel_config, Mapping) and not any(
            hasattr(parallel_config, name) for name in names):
        raise TypeError(f"{api}: `parallel_config` must be an OpParallelConfig-like object or a "
                        f"dict with data_parallel / model_parallel, got "
                        f"{type(parallel_config).__name__}")
    return tuple(_parallel_degree(parallel_config, name, api) for name in names)


def class_weight_tensor(weight, api, mean_only=False):
    """The class weights as a float32 [C] Tensor (None stays None): finite, of any sign (PyTorch
    semantics); a non-finite entry raises ValueError.

    ``mean_only``: the Cell uses the weights only in the weighted mean sum(w l) / sum(w), which
    does not change when every weight is multiplied by the same factor. The weights are then scaled
    by a power of two (exact) so that max |w| lies in [1, 2): the Cell's float32 sums stay finite
    for weights near the float32 limit (1e37 x a few rows overflows) and normal for denormal ones."""
    if weight is None:
        return None
    values = weight.astype(ms.float32).asnumpy() if isinstance(weight, ms.Tensor) else np.asarray(
        weight, dtype=np.float32)
    if values.ndim != 1:
        raise ValueError(f"{api}: `weight` must be 1-D (one entry per class), got shape "
                         f"{values.shape}")
    if not np.isfinite(values).all():
        position = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"{api}: `weight` must be finite, got {values[position]} at class "
                         f"{position}")
    largest = np.abs(values).max(initial=0.0)
    if mean_only and largest > 0:
        values = np.ldexp(values, 1 - np.frexp(largest)[1]).astype(np.float32)
    return ms.Tensor(values)


def check_flag(name, value, api):
    """``value`` as a bool; TypeError naming ``name`` unless it is a Python or numpy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{api}: `{name}` must be a bool, got {value!r}")
    return bool(value)


def check_positive_int(name, value, api):
    """``value`` as an int; ValueError naming ``name`` unless it is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{api}: `{name}` must be a positive int, got {value!r}")
    return int(value)


def wants_per_token_output(calculate_per_token_loss, seq_split_num, reduction, api):
    """Whether the Cell returns MindFormers' per-token (numerator, denominator) pair: with
    calculate_per_token_loss or seq_split_num > 1, which only make sense for reduction 'mean'."""
    per_token = calculate_per_token_loss or seq_split_num > 1
    if per_token and reduction != "mean":
        raise ValueError(f"{api}: calculate_per_token_loss=True or seq_split_num > 1 returns "
                         f"(numerator, denominator) of the mean, which needs reduction "
                         f"'mean', got {reduction!r}")
    return per_token
