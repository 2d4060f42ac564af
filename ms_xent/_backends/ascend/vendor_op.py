"""The Ascend op layer: the vendor operators, through MindSpore's built-in primitives or through
``ops.Custom(func="aclnnXxx", func_type="aot")``.

Nothing here has run on an NPU yet (see the README's Ascend section). What CPU tests check: the
registration objects below against the aclnn C prototypes (parameter count, order, names, C types,
output shapes and dtypes), the positional call arguments against the same prototypes, and that
the built-in primitives are reached with arguments their front end accepts (GRAPH_MODE compiles
up to kernel selection, which then fails on CPU).

aclnn prototypes (``aclnnXxxGetWorkspaceSize``; tensors, then host scalars, then outputs):

==================================  ==============================================================
operator                            parameters
==================================  ==============================================================
aclnnCrossEntropyLoss               input, target, weightOptional | char* reductionOptional,
                                    int64 ignoreIndex, double labelSmoothing,
                                    double lseSquareScaleForZloss, bool returnZloss |
                                    lossOut, logProbOut, zlossOut, lseForZlossOut
aclnnCrossEntropyLossGrad           gradLoss, logProb, target, weightOptional,
                                    gradZlossOptional, lseForZlossOptional |
                                    char* reductionOptional, int64 ignoreIndex,
                                    double labelSmoothing, double lseSquareScaleForZloss | out
aclnnBinaryCrossEntropyWithLogits   self, target, weightOptional, posWeightOptional |
                                    int64 reduction (0 none, 1 mean, 2 sum) | out
==================================  ==============================================================

The reg_info below uses the prototypes' own parameter names, so a reader (and the tests) can
compare them one to one. MindSpore turns each reg_info attribute into the C type of its
``value_type`` ("str" -> char*, "int" -> int64_t, "double" -> double, "bool" -> bool) and checks
the total count against the CANN header when the primitive is built on Ascend.

Vendor limits that shape how these are called (from the seed documents):
- ``lossOut`` is [N] for "none" and [1] otherwise; ``zlossOut`` has the shape of ``lossOut``;
  ``lseForZlossOut`` is [N]; all outputs have the dtype of ``input`` and none may be null.
- With gradients, "mean" accepts only default arguments and "sum"/"none" only label_smoothing 0.
  ms_xent therefore always calls the vendor op with "sum" or "none" and divides by the "mean"
  denominator itself, which also makes an all-ignored "mean" 0 instead of 0/0.
- The gradient op accepts only label_smoothing 0 and null z-loss inputs; targets are int64.
"""

import functools
import os

import mindspore as ms
from mindspore import ops
from mindspore.ops import auto_generate as generated_ops

from ms_xent._backends._mindspore import cached_primitive, counted_rows, total
from ms_xent._backends._reductions import reduce_rows, upstream_per_row
from ms_xent._backends.ascend import emulator
from ms_xent._backends.composed import binary_cross_entropy_with_logits_grad
from ms_xent._backends.cpu.aot_primitive import FLOAT_DTYPES, KernelSpec, build_reg_info, dtype_rows
from ms_xent._backends.cpu.build import cache_root

# The vendor routes: MindSpore's built-in primitive, ops.Custom(func="aclnnXxx"), and the CPU
# emulator of the aclnn operators (test infrastructure, ms_xent._backends.ascend.emulator).
ASCEND_BUILTIN = "ascend_builtin"
ASCEND_ACLNN_CUSTOM = "ascend_aclnn_custom"
ASCEND_EMULATED = "ascend_emulated"
F32 = ("float32",)
I64 = ("int64",)
# The vendor op (aclnnBinaryCrossEntropyWithLogits) takes the reduction as an integer.
BCE_REDUCTION_CODES = {0: "none", 1: "mean", 2: "sum"}
BCE_REDUCTION_VALUES = {name: code for code, name in BCE_REDUCTION_CODES.items()}
# A primitive instance, not ops.zeros_like, around the Cells with a bprop (the emulator's, the
# vendor rows): in GRAPH mode MindSpore 2.9 fails to differentiate around such a Cell when the
# forward calls the composite zeros_like that autodiff also uses ("The func graph is empty").
_ZEROS_LIKE = ops.ZerosLike()


def _same_dtype_as_first(first, *rest):
    return first


ACLNN_CROSS_ENTROPY_LOSS = KernelSpec(
    "aclnnCrossEntropyLoss", ("input", "target", "weightOptional"),
    ("lossOut", "logProbOut", "zlossOut", "lseForZlossOut"),
    dtype_rows(FLOAT_DTYPES, I64, F32, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={3: 0, 4: 0, 5: 0, 6: 0}),
    lambda input_dtype, *rest: (input_dtype,) * 4,
    optional_inputs=("weightOptional",),
    call_attrs=(("reductionOptional", "str"), ("ignoreIndex", "int"),
                ("labelSmoothing", "double"), ("lseSquareScaleForZloss", "double"),
                ("returnZloss", "bool")))

ACLNN_CROSS_ENTROPY_LOSS_GRAD = KernelSpec(
    "aclnnCrossEntropyLossGrad",
    ("gradLoss", "logProb", "target", "weightOptional", "gradZlossOptional",
     "lseForZlossOptional"),
    ("out",),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, I64, F32, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={1: 0, 4: 0, 5: 0, 6: 0}),
    _same_dtype_as_first,
    optional_inputs=("weightOptional", "gradZlossOptional", "lseForZlossOptional"),
    call_attrs=(("reductionOptional", "str"), ("ignoreIndex", "int"),
                ("labelSmoothing", "double"), ("lseSquareScaleForZloss", "double")))

ACLNN_BCE_WITH_LOGITS = KernelSpec(
    "aclnnBinaryCrossEntropyWithLogits", ("self", "target", "weightOptional", "posWeightOptional"),
    ("out",),
    dtype_rows(FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES, FLOAT_DTYPES,
               tie={1: 0, 2: 0, 3: 0, 4: 0}),
    _same_dtype_as_first,
    optional_inputs=("weightOptional", "posWeightOptional"),
    call_attrs=(("reduction", "int"),))

ACLNN_SPECS = (ACLNN_CROSS_ENTROPY_LOSS, ACLNN_CROSS_ENTROPY_LOSS_GRAD, ACLNN_BCE_WITH_LOGITS)


def ascend_reg_info(spec):
    """The ``reg_info`` of an aclnn spec for ``ops.Custom`` on Ascend."""
    return build_reg_info(spec, {}, target="Ascend")


def builtin_available(name):
    """True when this MindSpore has the built-in primitive ``name`` (e.g. "CrossEntropyLoss")."""
    return hasattr(generated_ops, name)


# ---- output shapes (documented in the aclnn pages; the loss is [1] unless "none") -------------

def cross_entropy_loss_out_shapes(reduction):
    """Output shapes of aclnnCrossEntropyLoss for one reduction, as an ``out_shape`` callable."""
    def out_shape(input_shape, *rest):
        n_rows = input_shape[0]
        loss_shape = [n_rows] if reduction == "none" else [1]
        # zlossOut and lseForZlossOut: empty tensors, z-loss being off (the only vendor mode).
        return loss_shape, list(input_shape), [0], [0]
    return out_shape


def cross_entropy_loss_grad_out_shape(grad_loss_shape, log_prob_shape, *rest):
    """aclnnCrossEntropyLossGrad: the gradient has the shape of ``logProb`` [N, C]."""
    return list(log_prob_shape)


def bce_with_logits_out_shape(reduction_code):
    """Output shape of aclnnBinaryCrossEntropyWithLogits: ``self``'s shape for none, else [1]."""
    def out_shape(input_shape, *rest):
        return list(input_shape) if reduction_code == BCE_REDUCTION_VALUES["none"] else [1]
    return out_shape


# ---- positional call arguments, in the prototypes' order (tensors, then host scalars) ---------

def cross_entropy_loss_args(input, target, weight, reduction, ignore_index,  # pylint: disable=redefined-builtin
                            label_smoothing=0.0, lse_square_scale_for_zloss=0.0,
                            return_zloss=False):
    """Arguments of aclnnCrossEntropyLoss up to (not including) the outputs."""
    return (input, target, weight, reduction, int(ignore_index), float(label_smoothing),
            float(lse_square_scale_for_zloss), bool(return_zloss))


def cross_entropy_loss_grad_args(grad_loss, log_prob, target, weight, reduction, ignore_index):
    """Arguments of aclnnCrossEntropyLossGrad; the z-loss inputs are null (the only value the
    vendor accepts), label smoothing and the z-loss scale 0.0."""
    return (grad_loss, log_prob, target, weight, None, None, reduction, int(ignore_index), 0.0,
            0.0)


def bce_with_logits_args(input, target, weight, pos_weight, reduction):  # pylint: disable=redefined-builtin
    """Arguments of aclnnBinaryCrossEntropyWithLogits; ``reduction`` as its integer code."""
    return (input, target, weight, pos_weight, BCE_REDUCTION_VALUES[reduction])


# ---- the Custom primitives (built lazily, on first use on the device) --------------------------

def _keep_callback_build_out_of_cwd():
    """On Ascend, ``ops.Custom`` compiles a small aclnn callback into ``MS_COMPILER_CACHE_PATH``,
    which defaults to ``./custom_kernel_meta/``; point it at ms_xent's cache unless it is set."""
    if not os.environ.get("MS_COMPILER_CACHE_PATH"):
        os.environ["MS_COMPILER_CACHE_PATH"] = os.path.join(cache_root(), "aclnn_callbacks")


def _zero_gradient(zeros_like, optional_tensor):
    """The gradient returned for an input that gets none: zeros, or 0 for a None input."""
    return 0 if optional_tensor is None else zeros_like(optional_tensor)


class AclnnPrimitive(ops.Custom):
    """``ops.Custom`` calling the CANN operator ``spec.symbol`` by name (Ascend only).

    ``out_shape`` is a Python callable (the aclnn path has no C++ infer); the call arguments are
    the tensors followed by the host scalars, as built by the ``*_args`` functions above.
    """

    def __init__(self, spec, out_shape, bprop=None):
        _keep_callback_build_out_of_cwd()
        super().__init__(func=spec.symbol, out_shape=out_shape, out_dtype=spec.out_dtype,
                         func_type="aot", bprop=bprop, reg_info=ascend_reg_info(spec))


class AclnnCrossEntropyLossGrad(AclnnPrimitive):
    """The gradient [N, C]; the reduction is a call argument and does not change the shapes."""

    spec = ACLNN_CROSS_ENTROPY_LOSS_GRAD

    def __init__(self):
        super().__init__(ACLNN_CROSS_ENTROPY_LOSS_GRAD, cross_entropy_loss_grad_out_shape)


def cross_entropy_loss_bprop(reduction, backward):
    """The bprop of the aclnnCrossEntropyLoss call: ``backward`` (the gradient operator) on
    ``log_prob``; only ``loss`` carries a gradient, as documented by the vendor."""
    # A primitive instance, not ops.zeros_like: the emulator's Cells reuse this bprop (see there).
    zeros_like = ops.ZerosLike()

    def bprop(input, target, weight, reduction_argument, ignore_index, label_smoothing,  # pylint: disable=redefined-builtin
              zloss_scale, return_zloss, out, dout):
        grad_loss = dout[0] if reduction == "none" else dout[0].reshape(())
        grad = backward(*cross_entropy_loss_grad_args(grad_loss, out[1], target, weight,
                                                      reduction_argument, ignore_index))
        return grad, zeros_like(target), _zero_gradient(zeros_like, weight), 0, 0, 0, 0, 0
    return bprop


def bce_with_logits_bprop(reduction):
    """The bprop of the aclnnBinaryCrossEntropyWithLogits call: ms_xent's closed form
    (:mod:`ms_xent._backends.composed`)."""
    zeros_like = ops.ZerosLike()

    def bprop(input, target, weight, pos_weight, reduction_code, out, dout):  # pylint: disable=redefined-builtin
        upstream = dout if reduction == "none" else dout.reshape(())
        grad_input, grad_target = binary_cross_entropy_with_logits_grad(
            upstream, input, target, weight, pos_weight, reduction)
        return (grad_input, grad_target, _zero_gradient(zeros_like, weight),
                _zero_gradient(zeros_like, pos_weight), 0)
    return bprop


class AclnnCrossEntropyLoss(AclnnPrimitive):
    """Forward, with :func:`cross_entropy_loss_bprop` on aclnnCrossEntropyLossGrad."""

    spec = ACLNN_CROSS_ENTROPY_LOSS

    def __init__(self, reduction):
        super().__init__(ACLNN_CROSS_ENTROPY_LOSS, cross_entropy_loss_out_shapes(reduction),
                         cross_entropy_loss_bprop(reduction, AclnnCrossEntropyLossGrad()))


class AclnnBinaryCrossEntropyWithLogits(AclnnPrimitive):
    """Forward, with :func:`bce_with_logits_bprop`."""

    spec = ACLNN_BCE_WITH_LOGITS

    def __init__(self, reduction):
        super().__init__(ACLNN_BCE_WITH_LOGITS,
                         bce_with_logits_out_shape(BCE_REDUCTION_VALUES[reduction]),
                         bce_with_logits_bprop(reduction))


@functools.lru_cache(maxsize=None)
def _emulated_operator(symbol, reduction, host_values):
    """The emulator Cell standing in for the aclnn Custom ``symbol`` on one set of host scalars,
    with the same spec and bprop (an lru_cache: called as Python while a graph compiles, as
    composed's Cells)."""
    if symbol == ACLNN_CROSS_ENTROPY_LOSS_GRAD.symbol:
        return emulator.EmulatedCrossEntropyLossGrad(ACLNN_CROSS_ENTROPY_LOSS_GRAD, host_values)
    if symbol == ACLNN_CROSS_ENTROPY_LOSS.symbol:
        grad = _EmulatedGradient()
        return emulator.EmulatedCrossEntropyLoss(ACLNN_CROSS_ENTROPY_LOSS,
                                                 cross_entropy_loss_bprop(reduction, grad),
                                                 host_values)
    return emulator.EmulatedBinaryCrossEntropyWithLogits(
        ACLNN_BCE_WITH_LOGITS, bce_with_logits_bprop(reduction), host_values)


class _EmulatedGradient:
    """The emulated aclnnCrossEntropyLossGrad called as its Custom is (all prototype arguments);
    used inside bprops, so it does not share :func:`aclnn_call` with the forward (a function
    called in both the forward and the bprop breaks MindSpore 2.9's GRAPH autodiff)."""

    def __call__(self, *arguments):
        n_tensors = len(ACLNN_CROSS_ENTROPY_LOSS_GRAD.inputs)
        operator = _emulated_operator(ACLNN_CROSS_ENTROPY_LOSS_GRAD.symbol, None,
                                      tuple(arguments[n_tensors:]))
        return operator(*arguments[:n_tensors])


def aclnn_call(vendor, primitive_class, arguments, reduction):
    """Calls the forward aclnn Custom primitive ``primitive_class`` with the prototype's
    ``arguments``, or under ``ascend_emulated`` its emulator: with :func:`aclnn_gradient`, the
    only places where the emulator replaces the vendor."""
    if vendor == ASCEND_EMULATED:
        n_tensors = len(primitive_class.spec.inputs)
        operator = _emulated_operator(primitive_class.spec.symbol, reduction,
                                      tuple(arguments[n_tensors:]))
        return operator(*arguments[:n_tensors])
    return cached_primitive(primitive_class, reduction)(*arguments)


def aclnn_gradient(vendor):
    """The aclnnCrossEntropyLossGrad operator (its Custom, or its emulator), called with all the
    prototype's arguments."""
    if vendor == ASCEND_EMULATED:
        return _EmulatedGradient()
    return cached_primitive(AclnnCrossEntropyLossGrad)


# ---- the vendor cross-entropy in ms_xent's conventions ----------------------------------------

def vendor_target(target, ignore_index, n_classes):
    """(counted rows (bool [N]), int64 target in [0, C) for the vendor, undefined rows (float32
    [N]: NaN on a counted row whose target lies outside [0, C), 0 elsewhere)).

    The seed documents say that a negative ignoreIndex ignores nothing and that targets lie in
    [0, C): ms_xent's default ignore_index -100 (PyTorch's) cannot be left to the vendor, nor can
    an out-of-range target (undefined there). So the vendor always sees in-range targets (class 0
    in place of the others), ms_xent masks the ignored rows itself (their loss rows and upstream
    gradients are 0) and adds the undefined rows' NaN to their loss and gradient, as every
    backend does (never a silently wrong number); the vendor is called with reduction "none"
    only, and ms_xent reduces ("mean" over the counted rows, 0 when there are none). This also
    keeps clear of the documented refusal of non-default arguments for "mean" with gradients."""
    target = target.astype(ms.int64)
    counted = counted_rows(target, ignore_index)
    in_range = (target >= 0) & (target < n_classes)
    safe = counted & in_range
    # masked_fill, not zeros + NaN: MindSpore 2.9's GRAPH mode folds ZerosLike(x) + c to zeros.
    undefined = ops.masked_fill(_ZEROS_LIKE(target).astype(ms.float32), counted & ~in_range,
                                float("nan"))
    return counted, ops.select(safe, target, _ZEROS_LIKE(target)), undefined


def vendor_forward(input, target, reduction, ignore_index, vendor):  # pylint: disable=redefined-builtin
    """(lossOut, logProbOut) of aclnnCrossEntropyLoss without class weights, smoothing or z-loss
    (``target`` int64, ``reduction`` a vendor reduction), on the route ``vendor``."""
    if vendor == ASCEND_BUILTIN:
        forward = cached_primitive(generated_ops.CrossEntropyLoss)
        loss, log_prob, _, _ = forward(input, target, None, reduction, ignore_index, 0.0, 0.0,
                                       False)
        return loss, log_prob
    weight = ops.ones((input.shape[1],), ms.float32)
    loss, log_prob, _, _ = aclnn_call(
        vendor, AclnnCrossEntropyLoss,
        cross_entropy_loss_args(input, target, weight, reduction, ignore_index), reduction)
    return loss, log_prob


def vendor_backward(grad_loss, log_prob, target, reduction, ignore_index, vendor):
    """aclnnCrossEntropyLossGrad without weights, smoothing or z-loss: ``grad_loss`` [N] for
    "none", else 0-d, in the dtype of ``log_prob``; ``target`` int64."""
    if vendor == ASCEND_BUILTIN:
        # MindSpore's own bprop of CrossEntropyLoss passes the [1]-shaped loss gradient.
        if reduction != "none":
            grad_loss = grad_loss.reshape((1,))
        backward = cached_primitive(generated_ops.CrossEntropyLossGrad)
        return backward(grad_loss, log_prob, target, None, None, None, reduction, ignore_index,
                        0.0, 0.0)
    return aclnn_gradient(vendor)(*cross_entropy_loss_grad_args(grad_loss, log_prob, target, None,
                                                                reduction, ignore_index))


def vendor_cross_entropy_loss(input, target, reduction, ignore_index, vendor):  # pylint: disable=redefined-builtin
    """Unweighted class-index cross-entropy without smoothing or z-loss, by the vendor op with
    reduction "none" (see :func:`vendor_target`).

    Returns ms_xent's (loss, log_prob, zloss, lse_for_zloss): a 0-d loss for "mean"/"sum", and
    the zero-size z-loss outputs of a call without z-loss.
    """
    counted, safe_target, undefined = vendor_target(target, ignore_index, input.shape[1])
    loss_rows, log_prob = vendor_forward(input, safe_target, "none", ignore_index, vendor)
    rows = loss_rows.astype(ms.float32)
    rows = ops.select(counted, rows, _ZEROS_LIKE(rows))
    # (1 + undefined) rows: NaN on the undefined rows, in the loss and, through the vendor
    # call's bprop, in their gradient.
    rows = rows + undefined * rows
    loss = reduce_rows(rows, reduction, total(counted.astype(ms.float32)))
    return loss.astype(input.dtype), log_prob, ops.zeros((0,), input.dtype), ops.zeros(
        (0,), ms.float32)


def vendor_cross_entropy_loss_grad(grad_loss, log_prob, target, reduction, ignore_index, vendor):
    """Gradient of :func:`vendor_cross_entropy_loss` from its ``log_prob``, by the vendor op."""
    counted, safe_target, undefined = vendor_target(target, ignore_index, log_prob.shape[1])
    counted32 = counted.astype(ms.float32)
    upstream = upstream_per_row(grad_loss, reduction, total(counted32), counted32) * counted32
    grad = vendor_backward(upstream.astype(log_prob.dtype), log_prob, safe_target, "none",
                           ignore_index, vendor)
    return grad + undefined.astype(grad.dtype).reshape(-1, 1)


def vendor_binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction,  # pylint: disable=redefined-builtin
                                            vendor):
    """BCE with logits by the vendor op; target, weight and pos_weight in the dtype of ``input``
    (the vendor's output takes the target's dtype). Returns 0-d for "mean"/"sum"."""
    target = target.astype(input.dtype)
    weight = None if weight is None else weight.astype(input.dtype)
    pos_weight = None if pos_weight is None else pos_weight.astype(input.dtype)
    if vendor == ASCEND_BUILTIN:
        loss = cached_primitive(generated_ops.BCEWithLogitsLoss, reduction)(input, target, weight,
                                                                            pos_weight)
    else:
        loss = aclnn_call(vendor, AclnnBinaryCrossEntropyWithLogits,
                          bce_with_logits_args(input, target, weight, pos_weight, reduction),
                          reduction)
    return loss if reduction == "none" else loss.reshape(())
