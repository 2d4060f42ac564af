"""One mechanism for every ms_xent CPU kernel: an ``ops.Custom(func_type="aot")`` primitive.

A kernel is described by a :class:`KernelSpec` (its exported symbol, input/output names, the
dtype combinations it accepts and its attributes); :class:`AotPrimitive` turns a spec plus
attribute values into a primitive whose kernel is the compiled library from
:mod:`ms_xent._backends.cpu.build`. Output shapes come from the C++ ``<Symbol>InferShape`` functions
(needed for GRAPH_MODE with dynamic shapes); output dtypes from a Python rule.

Primitives are created through :func:`ms_xent._backends._mindspore.cached_primitive` so that
PyNative code reuses one instance per attribute set, and graph mode instantiates them at compile
time.
"""

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

from mindspore import ops
from mindspore.ops import CustomRegOp

from ms_xent._backends.cpu.build import kernel_library

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")


@dataclass(frozen=True)
class KernelSpec:
    """Static description of one exported kernel symbol."""

    symbol: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    # Each row gives one dtype name per input then per output, in order.
    dtype_rows: Tuple[Tuple[str, ...], ...]
    # Maps the input dtypes to the output dtype(s) (MindSpore dtype objects).
    out_dtype: Callable
    # Inputs that may be None (reg_info param_type "optional"), e.g. aclnn's `weightOptional`.
    optional_inputs: Tuple[str, ...] = ()
    # Attributes passed as call arguments after the tensor inputs, as (name, value_type) with
    # value_type in CustomRegOp's vocabulary ("str", "int", "double", "bool"): the aclnn path.
    call_attrs: Tuple[Tuple[str, str], ...] = ()


def dtype_rows(*choices: Sequence[str], tie=None) -> Tuple[Tuple[str, ...], ...]:
    """Cartesian product of the per-position dtype choices.

    ``tie`` maps a position to an earlier position whose dtype it repeats (e.g. outputs in the
    dtype of the input), so only consistent combinations are registered.
    """
    tie = tie or {}
    rows = []
    for combo in itertools.product(*choices):
        row = list(combo)
        for position, source in tie.items():
            row[position] = row[source]
        rows.append(tuple(row))
    return tuple(dict.fromkeys(rows))


def build_reg_info(spec: KernelSpec, attrs: Dict[str, object], target: str = "CPU") -> dict:
    """The ``reg_info`` for ``ops.Custom``: inputs, outputs, attributes and dtype rows."""
    reg = CustomRegOp(spec.symbol)
    for index, name in enumerate(spec.inputs):
        reg = reg.input(index, name, "optional" if name in spec.optional_inputs else "required")
    for index, name in enumerate(spec.outputs):
        reg = reg.output(index, name)
    for name, value in attrs.items():
        reg = reg.attr(name, "required", "all", value=value)
    for name, value_type in spec.call_attrs:
        reg = reg.attr(name, "required", value_type)
    for row in spec.dtype_rows:
        reg = reg.dtype_format(*((dtype, "DefaultFormat") for dtype in row))
    return reg.target(target).get_op_info()


def _not_differentiable(symbol, n_inputs):
    """The bprop of the kernels that have none (the backward kernels): a clear error in place of
    MindSpore's "bprop not defined ... please create an issue". Reached by second-order
    differentiation (the gradient of a gradient) and by forward-mode differentiation (``jvp``,
    which MindSpore derives from the backward); raised when the graph is compiled in GRAPH mode.

    MindSpore reads a bprop's parameters (inputs, then ``out``, ``dout``; no ``*args``) and, in
    GRAPH mode, its source: one function per input count of the kernels without a bprop."""
    message = (f"ms_xent: the kernel {symbol} is not differentiable: second-order "
               f"differentiation (the gradient of a gradient) and forward-mode differentiation "
               f"(jvp, jacfwd) of ms_xent's fused losses are not supported; use first-order "
               f"reverse mode (mindspore.grad, value_and_grad)")

    def bprop5(in0, in1, in2, in3, in4, out, dout):
        raise NotImplementedError(message)

    def bprop7(in0, in1, in2, in3, in4, in5, in6, out, dout):
        raise NotImplementedError(message)

    return {5: bprop5, 7: bprop7}.get(n_inputs)


class AotPrimitive(ops.Custom):
    """An aot Custom primitive for one kernel spec and one set of attribute values (a kernel
    given no ``bprop`` raises a clear error when differentiated)."""

    def __init__(self, spec: KernelSpec, attrs: Dict[str, object], bprop=None):
        if bprop is None:
            bprop = _not_differentiable(spec.symbol, len(spec.inputs))
        super().__init__(
            func=f"{kernel_library()}:{spec.symbol}",
            out_shape=None,
            out_dtype=spec.out_dtype,
            func_type="aot",
            bprop=bprop,
            reg_info=build_reg_info(spec, attrs),
        )
        for name, value in attrs.items():
            self.add_prim_attr(name, value)
