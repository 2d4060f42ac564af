"""Which implementation serves a loss call, and the dispatch for devices other than CPU.

On CPU the functional layer runs ms_xent's aot kernels and never enters this module's dispatch
(:func:`uses_cpu_kernels` is a cached constant). On other devices it calls
:func:`cross_entropy_loss`, :func:`cross_entropy_loss_grad`, :func:`cross_entropy_rows` or
:func:`binary_cross_entropy_with_logits` below, which pick a backend with the pure functions
:func:`choose_cross_entropy_backend` / :func:`choose_bce_backend` from the device target and the
static options (Python values and shapes: constants in PyNative and in GRAPH_MODE alike).

Backends:
- ``cpu_kernel``: ms_xent's fused C++ kernels (device CPU).
- ``ascend_builtin``: MindSpore's built-in primitive over the vendor operator (CrossEntropyLoss /
  CrossEntropyLossGrad, BCEWithLogitsLoss), whose bprop MindSpore provides.
- ``ascend_aclnn_custom``: ``ops.Custom(func="aclnnXxx", func_type="aot")`` calling the same vendor
  operator by name (:mod:`ms_xent.ops.ascend_op`), for a MindSpore without the built-in primitive.
- ``composed``: an exact composition of MindSpore primitives (:mod:`ms_xent.ops.composed`); works on
  any device.

Cross-entropy (first matching row wins):

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
device CPU                               cpu_kernel              the fused aot kernels
device neither CPU nor Ascend            composed                no vendor operator known
MS_XENT_ASCEND_BACKEND=composed          composed                user override (bring-up, A/B)
probability targets [N, C]               composed                vendor: class indices only
class weights given                      composed                vendor documents weights in (0, 1];
                                                                 ms_xent allows any w >= 0
label_smoothing > 0                      composed                vendor gradient: 0.0 only
z-loss (scale > 0, return_zloss, or a    composed                vendor: z-loss not enabled
z-loss gradient)
N == 0, or N >= 200000 when N is static  composed                vendor: N in (0, 200000)
built-in primitive present (and no       ascend_builtin          MindSpore's maintained path
MS_XENT_ASCEND_BACKEND=aclnn_custom)
otherwise                                ascend_aclnn_custom     vendor op by name
=======================================  ======================  ===================================

Not in the table because every backend serves them: reduction ("mean" is computed as the vendor's
"sum" divided by the number of counted rows; the seed documents refuse non-default arguments for
"mean" with gradients, and an all-ignored "mean" is 0, not 0/0), ignore_index, the input dtype
(float32 / float16 / bfloat16), int32 targets (cast to int64, exact). A dynamic N (unknown at
compile time) goes to the vendor op; an N beyond its limit then fails there with the vendor's
error, never silently.

:func:`cross_entropy_rows` (the Cells' building block) is always ``composed`` off CPU: it must
return a differentiable per-row lse, which the vendor operator does not produce.

BCE with logits:

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
device CPU                               cpu_kernel              the fused aot kernels
device neither CPU nor Ascend            composed                no vendor operator known
MS_XENT_ASCEND_BACKEND=composed          composed                user override
zero-size input                          composed                vendor behaviour at 0 undocumented
MS_XENT_ASCEND_BACKEND=aclnn_custom,     ascend_aclnn_custom     vendor op by name (its bprop is
or no built-in primitive                                         ms_xent's closed form)
pos_weight given                         composed                see below
otherwise                                ascend_builtin          MindSpore's BCEWithLogitsLoss
=======================================  ======================  ===================================

Weights, pos_weight (broadcast to the target) and the three reductions are served by the vendor
operator; target, weight and pos_weight are passed in the dtype of the input. MindSpore 2.9's
bprop of BCEWithLogitsLoss computes the target gradient unstably whenever a pos_weight tensor is
passed (measured on CPU in float32: inf at x = -100 and x >= 30, -15.94 instead of -16 at x = 16;
the gradient graph is built before kernels are chosen, so the expression is the same on Ascend).
Calls with pos_weight therefore take the composed route, whose gradients are exact, and the
built-in is never handed ms_xent's all-ones stand-in for an absent pos_weight.

Fused linear + cross-entropy (:func:`ms_xent.ops.linear_cross_entropy`), CPU only in this
release (both backends run ms_xent's CPU kernels; another device raises NotImplementedError):

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
MS_XENT_LINEAR_CE_BACKEND=matmul_chunks  matmul_chunks           user override (A/B, bring-up)
the MindSpore wheel ships oneDNN         cpu_kernel              one C++ kernel over oneDNN's
(lib/libdnnl.so.3)                                               products, vocabulary blocks
otherwise                                matmul_chunks           row chunks of MindSpore MatMul +
                                                                 the fused cross-entropy kernels
=======================================  ======================  ===================================

Environment: ``MS_XENT_ASCEND_BACKEND`` = ``builtin`` (default) | ``aclnn_custom`` | ``composed``
(read once). It only chooses among the backends able to serve a call: forcing a vendor backend
never sends it options it cannot compute.
"""

import functools
import os

import mindspore as ms
from mindspore.ops import constexpr

from ms_xent.ops import ascend_op, composed

CPU_KERNEL = "cpu_kernel"
MATMUL_CHUNKS = "matmul_chunks"
LINEAR_BACKEND_VARIABLE = "MS_XENT_LINEAR_CE_BACKEND"
LINEAR_BACKENDS = (CPU_KERNEL, MATMUL_CHUNKS)
ASCEND_BUILTIN = "ascend_builtin"
ASCEND_ACLNN_CUSTOM = "ascend_aclnn_custom"
COMPOSED = "composed"
BACKENDS = (CPU_KERNEL, ASCEND_BUILTIN, ASCEND_ACLNN_CUSTOM, COMPOSED)

# Vendor limit on N (rows of the logits): forward (0, 200000], gradient N < 200000.
VENDOR_MAX_ROWS = 199999
PREFERENCE_VARIABLE = "MS_XENT_ASCEND_BACKEND"
PREFERENCES = {"builtin": ASCEND_BUILTIN, "aclnn_custom": ASCEND_ACLNN_CUSTOM,
               "composed": COMPOSED}


@functools.lru_cache(maxsize=None)
def device_target():
    """The device MindSpore runs on ("CPU", "Ascend", "GPU"), read once.

    ``get_context("device_target")`` reflects both ``mindspore.set_device`` (MindSpore 2.9's API,
    which sets the same context parameter) and the older ``set_context(device_target=...)``, which
    ``mindspore.get_current_device()`` does not see. MindSpore fixes the device when it first runs
    an op, so caching is safe; set the device before the first loss call.
    """
    return ms.get_context("device_target")


def uses_cpu_kernels():
    """True on CPU: the functional layer then runs the aot kernels (the hot path)."""
    return device_target() == "CPU"


@functools.lru_cache(maxsize=None)
def preferred_backend():
    """The backend named by ``MS_XENT_ASCEND_BACKEND`` (default: the built-in primitive)."""
    value = os.environ.get(PREFERENCE_VARIABLE, "builtin").strip().lower()
    if value not in PREFERENCES:
        raise ValueError(f"{PREFERENCE_VARIABLE} must be one of {sorted(PREFERENCES)}, "
                         f"got {value!r}")
    return PREFERENCES[value]


def _vendor_backend(builtin_available, preference):
    if preference == ASCEND_ACLNN_CUSTOM or not builtin_available:
        return ASCEND_ACLNN_CUSTOM
    return ASCEND_BUILTIN


def choose_cross_entropy_backend(device_target_name, *, soft_target=False, weighted=False,
                                 label_smoothing=0.0, zloss=False, n_rows=-1,
                                 builtin_available=True, preference=ASCEND_BUILTIN):
    """The backend for a cross-entropy call (forward or gradient); see the module table.

    ``n_rows`` < 0 means unknown at compile time (dynamic shape).
    """
    if device_target_name == "CPU":
        return CPU_KERNEL
    if device_target_name != "Ascend" or preference == COMPOSED:
        return COMPOSED
    if soft_target or weighted or label_smoothing > 0 or zloss:
        return COMPOSED
    if n_rows == 0 or n_rows > VENDOR_MAX_ROWS:
        return COMPOSED
    return _vendor_backend(builtin_available, preference)


def choose_bce_backend(device_target_name, *, n_elements=-1, pos_weighted=False,
                       builtin_available=True, preference=ASCEND_BUILTIN):
    """The backend for a BCE-with-logits call; ``n_elements`` < 0 means unknown (dynamic)."""
    if device_target_name == "CPU":
        return CPU_KERNEL
    if device_target_name != "Ascend" or preference == COMPOSED or n_elements == 0:
        return COMPOSED
    vendor = _vendor_backend(builtin_available, preference)
    if vendor == ASCEND_BUILTIN and pos_weighted:
        return COMPOSED
    return vendor


def choose_linear_cross_entropy_backend(device_target_name, *, onednn_available,
                                        preference=None):
    """The backend of the fused linear + cross-entropy; ``preference``: the value of
    ``MS_XENT_LINEAR_CE_BACKEND`` (None: automatic)."""
    if preference is not None and preference not in LINEAR_BACKENDS:
        raise ValueError(f"{LINEAR_BACKEND_VARIABLE} must be one of {list(LINEAR_BACKENDS)}, "
                         f"got {preference!r}")
    if device_target_name != "CPU":
        raise NotImplementedError(
            f"linear_cross_entropy runs on CPU only in this release (both of its backends use "
            f"ms_xent's CPU kernels); the device is {device_target_name!r}. Compute the logits "
            f"and use ms_xent.nn.CrossEntropyLoss there.")
    if preference == CPU_KERNEL and not onednn_available:
        raise ValueError(f"{LINEAR_BACKEND_VARIABLE}=cpu_kernel needs a MindSpore wheel with "
                         f"lib/libdnnl.so.3")
    if preference == MATMUL_CHUNKS or not onednn_available:
        return MATMUL_CHUNKS
    return CPU_KERNEL


def linear_cross_entropy_backend(onednn_available):
    """:func:`choose_linear_cross_entropy_backend` for this process (the environment is read at
    each call, so that tests can switch it)."""
    preference = os.environ.get(LINEAR_BACKEND_VARIABLE, "").strip().lower() or None
    return choose_linear_cross_entropy_backend(device_target(), onednn_available=onednn_available,
                                               preference=preference)


def _static_size(dim):
    return -1 if dim is None or dim < 0 else dim


@constexpr
def _cross_entropy_backend(input_shape, soft, weighted, label_smoothing, zloss):
    return choose_cross_entropy_backend(
        device_target(), soft_target=soft, weighted=weighted, label_smoothing=label_smoothing,
        zloss=zloss, n_rows=_static_size(input_shape[0]),
        builtin_available=ascend_op.builtin_available("CrossEntropyLoss"),
        preference=preferred_backend())


@constexpr
def _bce_backend(input_shape, pos_weighted):
    sizes = [_static_size(dim) for dim in input_shape]
    n_elements = -1 if -1 in sizes else int(functools.reduce(lambda a, b: a * b, sizes, 1))
    return choose_bce_backend(device_target(), n_elements=n_elements, pos_weighted=pos_weighted,
                              builtin_available=ascend_op.builtin_available("BCEWithLogitsLoss"),
                              preference=preferred_backend())


def cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing,  # pylint: disable=redefined-builtin
                       lse_square_scale_for_zloss, return_zloss, soft):
    """:func:`ms_xent.ops.cross_entropy_loss` off CPU (arguments validated, weight None or [C])."""
    choice = _cross_entropy_backend(input.shape, soft, weight is not None, label_smoothing,
                                    lse_square_scale_for_zloss > 0 or return_zloss)
    if choice == COMPOSED:
        return composed.cross_entropy_loss(input, target, weight, reduction, ignore_index,
                                           label_smoothing, lse_square_scale_for_zloss,
                                           return_zloss, soft)
    return ascend_op.vendor_cross_entropy_loss(input, target, reduction, ignore_index,
                                               choice == ASCEND_BUILTIN)


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss,
                            reduction, ignore_index, label_smoothing, lse_square_scale_for_zloss,
                            soft):
    """:func:`ms_xent.ops.cross_entropy_loss_grad` off CPU (arguments validated)."""
    zloss = grad_zloss is not None and lse_for_zloss is not None and lse_square_scale_for_zloss > 0
    choice = _cross_entropy_backend(log_prob.shape, soft, weight is not None, label_smoothing,
                                    zloss)
    if choice == COMPOSED:
        return composed.cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss,
                                                lse_for_zloss, reduction, ignore_index,
                                                label_smoothing, lse_square_scale_for_zloss, soft)
    return ascend_op.vendor_cross_entropy_loss_grad(grad_loss, log_prob, target, reduction,
                                                    ignore_index, choice == ASCEND_BUILTIN)


def cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, soft):
    """:func:`ms_xent.ops.cross_entropy_rows` off CPU: always composed (see the module notes)."""
    return composed.cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, soft)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction,  # pylint: disable=redefined-builtin
                                     pos_weighted):
    """BCE with logits off CPU (arguments validated; ``reduction`` a name; ``pos_weighted``
    says whether the caller gave a pos_weight, ``pos_weight`` may be its all-ones stand-in)."""
    choice = _bce_backend(input.shape, pos_weighted)
    if choice == COMPOSED:
        return composed.binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                         reduction)
    return ascend_op.vendor_binary_cross_entropy_with_logits(
        input, target, weight, pos_weight if pos_weighted else None, reduction,
        choice == ASCEND_BUILTIN)
