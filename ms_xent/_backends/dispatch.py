"""The one dispatch table of ms_xent: which backend serves a call.

Backends (peers with one contract: ``cross_entropy_rows``, ``cross_entropy_loss``,
``cross_entropy_loss_grad``, ``binary_cross_entropy_with_logits`` and ``RowKernels``, the per-row
forward / backward that vocabulary-parallel rows and the row-chunked linear + cross-entropy are
built on; the backward recomputes the softmax from the logits and an opaque per-row shift state):

- ``cpu``: ms_xent's fused C++ kernels (:mod:`ms_xent._backends.cpu`), device CPU only.
- ``composed``: MindSpore primitives (:mod:`ms_xent._backends.composed`), any device.
- ``ascend``: the vendor operators (:mod:`ms_xent._backends.ascend`), through MindSpore's built-in
  primitive (``ascend_builtin``) or ``ops.Custom(func="aclnnXxx")`` (``ascend_aclnn_custom``); the
  calls they cannot serve fall back to ``composed`` (rows below).
- ``ascend_emulated`` (TEST INFRASTRUCTURE, CPU only, never chosen by ``auto``): the ``ascend``
  rows below with the aclnn call replaced by a CPU emulator of the vendor operators' contract
  (:mod:`ms_xent._backends.ascend.emulator`); everything else is the Ascend-route code.

Choosing: ``MS_XENT_BACKEND`` = ``auto`` (default) | ``cpu`` | ``composed`` | ``ascend`` |
``ascend_emulated``, read by
:func:`requested_backend` only, and overridden in Python by :func:`use_backend` (a context
manager, also exported as ``ms_xent.use_backend``). The choice is a Python value computed when a
call is traced (``constexpr``), so it works in PYNATIVE and GRAPH mode alike; a compiled graph
keeps the backend it was compiled with (build a new Cell or ``ms.jit`` function to switch).

Requested backend -> the row every API starts from:

=========================  ===============  ============================================
MS_XENT_BACKEND            device           row
=========================  ===============  ============================================
composed                   any              composed
cpu                        CPU              cpu      (another device: ValueError)
ascend                     Ascend           ascend   (another device: ValueError)
ascend_emulated            CPU              ascend, the vendor emulated (another device: ValueError)
auto                       CPU              cpu
auto                       Ascend           ascend
auto                       GPU, other       composed
=========================  ===============  ============================================

The vendor variant is a sub-choice of ``ascend``: ``MS_XENT_ASCEND_BACKEND`` = ``builtin``
(default) | ``aclnn_custom``. (Its former value ``composed`` is now ``MS_XENT_BACKEND=composed``.)

Cross-entropy on the ``ascend`` row (first matching row wins):

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
probability targets [N, C]               composed                vendor: class indices only
class weights given                      composed                vendor documents weights in (0, 1];
                                                                 ms_xent allows any finite w
label_smoothing > 0                      composed                vendor gradient: 0.0 only
z-loss (scale > 0, return_zloss, or a    composed                vendor: z-loss not enabled
z-loss gradient)
logit_scale != 1 or logit_softcap > 0    composed                vendor: no logit map
N == 0, or N >= 200000 when N is static  composed                vendor: N in (0, 200000)
ignore_index >= C                        composed                vendor: ignoreIndex < C
MS_XENT_BACKEND=ascend_emulated          ascend_emulated         the vendor's CPU emulator
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

Per-row values (:func:`ms_xent.ops.cross_entropy_rows`, hence the Cells) on the ``ascend`` row
(first matching row wins; :mod:`ms_xent._backends.ascend.rows` for the vendor route):

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
probability targets [N, C]               composed                vendor: class indices only
class weights given                      composed                vendor: weights in (0, 1] only
                                                                 (values unknown when tracing)
logit_scale != 1 or logit_softcap > 0    composed                vendor: no logit map
float16 / bfloat16 logits                composed                vendor: loss and log_prob (hence
                                                                 the lse) rounded to the input
                                                                 dtype; the rows are float32
N == 0, or N >= 200000 when N is static  composed                vendor: N in (0, 200000)
ignore_index >= C                        composed                vendor: ignoreIndex < C
otherwise (label smoothing and the       vendor route, as for    one fused vendor kernel; smoothing
z-loss of the Cells included)            cross_entropy_loss      (vendor gradient: 0 only) and the
                                                                 lse gradient 2 s lse p composed
                                                                 around aclnnCrossEntropyLossGrad
=======================================  ======================  ===================================

Memory, the trade-off of the last row: the vendor route keeps log_prob [N, C] in the input dtype
from the forward to the backward (as large as the logits); the memory-lean composed rows keep
float32 [N] values only and recompute the softmax. ``MS_XENT_BACKEND=composed`` picks the lean
rows on Ascend. The lse is recovered from log_prob (lse_n = x[n, c*] - log_prob[n, c*] at the
row's argmax).

``RowKernels`` (vocabulary-parallel rows, the row chunks of linear + cross-entropy) need the
per-row shift state of a partial vocabulary, which the vendor operator does not expose: on the
``ascend`` rows they are ``composed``.

BCE with logits on the ``ascend`` row:

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
zero-size input                          composed                vendor behaviour at 0 undocumented
MS_XENT_BACKEND=ascend_emulated          ascend_emulated         the vendor's CPU emulator (as
                                                                 ascend_aclnn_custom)
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

Fused linear + cross-entropy (:func:`ms_xent.ops.linear_cross_entropy`):

=======================================  ======================  ===================================
condition                                backend                 reason
=======================================  ======================  ===================================
row cpu, the MindSpore wheel ships       cpu_kernel              one C++ kernel over oneDNN's
oneDNN (lib/libdnnl.so.3)                                        products, vocabulary blocks
otherwise                                matmul_chunks           row chunks of MindSpore MatMul +
                                                                 the per-row cross-entropy of the
                                                                 row's rows backend (cpu kernels,
                                                                 or composed on every other row)
=======================================  ======================  ===================================

(The former ``MS_XENT_LINEAR_CE_BACKEND=matmul_chunks`` is ``MS_XENT_BACKEND=composed``.)
"""

import contextlib
import functools
import os

import mindspore as ms
from mindspore.ops import constexpr

from ms_xent._backends import composed
from ms_xent._backends._mindspore import static_size
from ms_xent._backends.ascend import backend as ascend
from ms_xent._backends.ascend.vendor_op import (ASCEND_ACLNN_CUSTOM, ASCEND_BUILTIN,
                                                ASCEND_EMULATED, builtin_available)
from ms_xent._backends.cpu import backend as cpu

AUTO = "auto"
CPU_KERNEL = "cpu"
COMPOSED = "composed"
ASCEND = "ascend"
REQUESTS = (AUTO, CPU_KERNEL, COMPOSED, ASCEND, ASCEND_EMULATED)
BACKEND_VARIABLE = "MS_XENT_BACKEND"
BACKENDS = (CPU_KERNEL, ASCEND_BUILTIN, ASCEND_ACLNN_CUSTOM, ASCEND_EMULATED, COMPOSED)
VENDOR_BACKENDS = (ASCEND_BUILTIN, ASCEND_ACLNN_CUSTOM, ASCEND_EMULATED)
MATMUL_CHUNKS = "matmul_chunks"
# The device each forced backend needs.
REQUIRED_DEVICE = {CPU_KERNEL: "CPU", ASCEND: "Ascend", ASCEND_EMULATED: "CPU"}
# The rows whose calls the vendor table (ascend) decides.
VENDOR_ROWS = (ASCEND, ASCEND_EMULATED)

# Vendor limit on N (rows of the logits): forward (0, 200000], gradient N < 200000.
VENDOR_MAX_ROWS = 199999
VARIANT_VARIABLE = "MS_XENT_ASCEND_BACKEND"
VARIANTS = {"builtin": ASCEND_BUILTIN, "aclnn_custom": ASCEND_ACLNN_CUSTOM}

_overrides = []


@functools.lru_cache(maxsize=None)
def device_target():
    """The device MindSpore runs on ("CPU", "Ascend", "GPU"), read once.

    ``get_context("device_target")`` reflects both ``mindspore.set_device`` (MindSpore 2.9's API,
    which sets the same context parameter) and the older ``set_context(device_target=...)``, which
    ``mindspore.get_current_device()`` does not see. MindSpore fixes the device when it first runs
    an op, so caching is safe; set the device before the first loss call.
    """
    return ms.get_context("device_target")


@functools.lru_cache(maxsize=None)
def _checked_request(value, source):
    value = str(value).strip().lower()
    if value not in REQUESTS:
        raise ValueError(f"{source} must be one of {list(REQUESTS)}, got {value!r}")
    return value


def requested_backend():
    """The innermost :func:`use_backend`, else ``MS_XENT_BACKEND`` (default "auto")."""
    if _overrides:
        return _overrides[-1]
    return _checked_request(os.environ.get(BACKEND_VARIABLE) or AUTO, BACKEND_VARIABLE)


@contextlib.contextmanager
def use_backend(name):
    """Runs the calls traced inside the block on backend ``name`` ("auto", "cpu", "composed",
    "ascend", "ascend_emulated"), whatever ``MS_XENT_BACKEND`` says. PYNATIVE calls and graphs
    compiled inside the block use it; a graph compiled before keeps its backend.

    Args:
        name: str, one of the values of ``MS_XENT_BACKEND`` (no default, case-insensitive);
            another name raises ValueError naming ``use_backend``.

    Example: ``with ms_xent.use_backend("composed"): loss = cross_entropy_loss(x, y)[0]``.
    """
    _overrides.append(_checked_request(name, "use_backend"))
    try:
        yield
    finally:
        _overrides.pop()


def ascend_variant():
    """The vendor variant named by ``MS_XENT_ASCEND_BACKEND`` (default: the built-in primitive)."""
    value = os.environ.get(VARIANT_VARIABLE, "builtin").strip().lower()
    if value == COMPOSED:
        raise ValueError(f"{VARIANT_VARIABLE}=composed is now {BACKEND_VARIABLE}=composed")
    if value not in VARIANTS:
        raise ValueError(f"{VARIANT_VARIABLE} must be one of {sorted(VARIANTS)}, got {value!r}")
    return VARIANTS[value]


def requested_row(device_target_name, requested=AUTO):
    """The row of the table every API starts from (see the module table)."""
    if requested == COMPOSED:
        return COMPOSED
    if requested in REQUIRED_DEVICE:
        if device_target_name != REQUIRED_DEVICE[requested]:
            raise ValueError(f"{BACKEND_VARIABLE}={requested} needs device "
                             f"{REQUIRED_DEVICE[requested]}, the device is {device_target_name!r}")
        return requested
    if device_target_name == "CPU":
        return CPU_KERNEL
    return ASCEND if device_target_name == "Ascend" else COMPOSED


def _vendor_backend(builtin, variant, row=ASCEND):
    if row == ASCEND_EMULATED:
        return ASCEND_EMULATED
    if variant == ASCEND_ACLNN_CUSTOM or not builtin:
        return ASCEND_ACLNN_CUSTOM
    return ASCEND_BUILTIN


def choose_cross_entropy_backend(device_target_name, *, requested=AUTO, soft_target=False,
                                 weighted=False, label_smoothing=0.0, zloss=False, n_rows=-1,
                                 builtin_available=True, variant=ASCEND_BUILTIN,  # pylint: disable=redefined-outer-name
                                 logit_map=False, ignore_index_too_large=False):
    """The backend for a cross-entropy call (forward or gradient); see the module table.

    ``n_rows`` < 0 means unknown at compile time (dynamic shape); ``logit_map``: a logit scale
    other than 1 or a softcap; ``ignore_index_too_large``: ignore_index >= C.
    """
    row = requested_row(device_target_name, requested)
    if row not in VENDOR_ROWS:
        return row
    if soft_target or weighted or label_smoothing > 0 or zloss or logit_map:
        return COMPOSED
    if n_rows == 0 or n_rows > VENDOR_MAX_ROWS or ignore_index_too_large:
        return COMPOSED
    return _vendor_backend(builtin_available, variant, row)


def choose_cross_entropy_rows_backend(device_target_name, *, requested=AUTO, soft_target=False,
                                      weighted=False, logit_map=False, half_precision=False,
                                      n_rows=-1, ignore_index_too_large=False, builtin_available=True,  # pylint: disable=redefined-outer-name
                                      variant=ASCEND_BUILTIN):
    """The backend of :func:`ms_xent.ops.cross_entropy_rows` (the Cells); see the module table."""
    row = requested_row(device_target_name, requested)
    if row not in VENDOR_ROWS:
        return row
    if soft_target or weighted or logit_map or half_precision:
        return COMPOSED
    if n_rows == 0 or n_rows > VENDOR_MAX_ROWS or ignore_index_too_large:
        return COMPOSED
    return _vendor_backend(builtin_available, variant, row)


@functools.lru_cache(maxsize=None)
def choose_rows_backend(device_target_name, *, requested=AUTO):
    """The backend of the per-row values (rows, Cells, vocabulary-parallel, linear chunks)."""
    row = requested_row(device_target_name, requested)
    return CPU_KERNEL if row == CPU_KERNEL else COMPOSED


def choose_bce_backend(device_target_name, *, requested=AUTO, n_elements=-1, pos_weighted=False,
                       builtin_available=True, variant=ASCEND_BUILTIN):  # pylint: disable=redefined-outer-name
    """The backend for a BCE-with-logits call; ``n_elements`` < 0 means unknown (dynamic)."""
    row = requested_row(device_target_name, requested)
    if row not in VENDOR_ROWS:
        return row
    if n_elements == 0:
        return COMPOSED
    vendor = _vendor_backend(builtin_available, variant, row)
    if vendor == ASCEND_BUILTIN and pos_weighted:
        return COMPOSED
    return vendor


def choose_linear_cross_entropy_backend(device_target_name, *, requested=AUTO,
                                        onednn_available=True):
    """(backend, rows backend) of the fused linear + cross-entropy."""
    rows = choose_rows_backend(device_target_name, requested=requested)
    if rows == CPU_KERNEL and onednn_available:
        return CPU_KERNEL, rows
    return MATMUL_CHUNKS, rows


def _ignore_index_too_large(input_shape, ignore_index):
    n_classes = static_size(input_shape[1])
    return n_classes >= 0 and ignore_index >= n_classes


@constexpr
def _cross_entropy_backend(input_shape, soft, weighted, label_smoothing, zloss, ignore_index,
                           logit_map=False):
    return choose_cross_entropy_backend(
        device_target(), requested=requested_backend(), soft_target=soft, weighted=weighted,
        label_smoothing=label_smoothing, zloss=zloss, n_rows=static_size(input_shape[0]),
        builtin_available=builtin_available("CrossEntropyLoss"), variant=ascend_variant(),
        logit_map=logit_map,
        ignore_index_too_large=_ignore_index_too_large(input_shape, ignore_index))


@constexpr
def _cross_entropy_rows_backend(input_shape, input_dtype, soft, weighted, ignore_index, logit_map):
    return choose_cross_entropy_rows_backend(
        device_target(), requested=requested_backend(), soft_target=soft, weighted=weighted,
        logit_map=logit_map, half_precision=input_dtype in (ms.float16, ms.bfloat16),
        n_rows=static_size(input_shape[0]),
        ignore_index_too_large=_ignore_index_too_large(input_shape, ignore_index),
        builtin_available=builtin_available("CrossEntropyLoss"), variant=ascend_variant())


@constexpr
def rows_backend():
    """:func:`choose_rows_backend` for this call (a constant in GRAPH mode). The hot path of every
    Cell call: :func:`requested_backend` inlined, the cached functions entered only once."""
    requested = _overrides[-1] if _overrides else _checked_request(
        os.environ.get(BACKEND_VARIABLE) or AUTO, BACKEND_VARIABLE)
    return choose_rows_backend(device_target(), requested=requested)


@constexpr
def _bce_backend(input_shape, pos_weighted):
    sizes = [-1] if input_shape is None else [static_size(dim) for dim in input_shape]
    n_elements = -1 if -1 in sizes else int(functools.reduce(lambda a, b: a * b, sizes, 1))
    return choose_bce_backend(device_target(), requested=requested_backend(),
                              n_elements=n_elements, pos_weighted=pos_weighted,
                              builtin_available=builtin_available("BCEWithLogitsLoss"),
                              variant=ascend_variant())


def linear_cross_entropy_backend(onednn_available):
    """:func:`choose_linear_cross_entropy_backend` for this call."""
    return choose_linear_cross_entropy_backend(device_target(), requested=requested_backend(),
                                               onednn_available=onednn_available)


def row_kernels(backend_name, ignore_index, label_smoothing, weighted, soft):
    """A new ``RowKernels`` Cell of the rows backend ``backend_name`` (callers cache it)."""
    if backend_name == CPU_KERNEL:
        return cpu.RowKernels(ignore_index, label_smoothing, weighted, soft)
    return composed.RowKernels(ignore_index, label_smoothing, weighted, soft)


def cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, soft,
                       logit_scale=1.0, logit_softcap=0.0, return_argmax=False):
    """:func:`ms_xent.ops.cross_entropy_rows` (arguments validated, weight None or float32 [C])."""
    arguments = (logits, target, weight, ignore_index, label_smoothing, soft, logit_scale,
                 logit_softcap, return_argmax)
    choice = _cross_entropy_rows_backend(logits.shape, logits.dtype, soft, weight is not None,
                                         ignore_index,
                                         logit_scale != 1.0 or logit_softcap > 0)
    if choice == CPU_KERNEL:
        return cpu.cross_entropy_rows(*arguments)
    if choice == COMPOSED:
        return composed.cross_entropy_rows(*arguments)
    return ascend.cross_entropy_rows(*arguments, vendor=choice)


def cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing,  # pylint: disable=redefined-builtin
                       lse_square_scale_for_zloss, return_zloss, soft, logit_scale=1.0,
                       logit_softcap=0.0):
    """:func:`ms_xent.ops.cross_entropy_loss` (arguments validated, weight None or float32 [C])."""
    logit_map = logit_scale != 1.0 or logit_softcap > 0
    choice = _cross_entropy_backend(input.shape, soft, weight is not None, label_smoothing,
                                    lse_square_scale_for_zloss > 0 or return_zloss, ignore_index,
                                    logit_map)
    arguments = (input, target, weight, reduction, ignore_index, label_smoothing,
                 lse_square_scale_for_zloss, return_zloss, soft)
    if choice == CPU_KERNEL:
        return cpu.cross_entropy_loss(*arguments, logit_scale=logit_scale,
                                      logit_softcap=logit_softcap)
    if choice == COMPOSED:
        return composed.cross_entropy_loss(*arguments, logit_scale=logit_scale,
                                           logit_softcap=logit_softcap)
    return ascend.cross_entropy_loss(*arguments, vendor=choice)


def cross_entropy_loss_grad(grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss,
                            reduction, ignore_index, label_smoothing, lse_square_scale_for_zloss,
                            soft):
    """:func:`ms_xent.ops.cross_entropy_loss_grad` (arguments validated)."""
    zloss = grad_zloss is not None and lse_for_zloss is not None and lse_square_scale_for_zloss > 0
    choice = _cross_entropy_backend(log_prob.shape, soft, weight is not None, label_smoothing,
                                    zloss, ignore_index)
    arguments = (grad_loss, log_prob, target, weight, grad_zloss, lse_for_zloss, reduction,
                 ignore_index, label_smoothing, lse_square_scale_for_zloss, soft)
    if choice == CPU_KERNEL:
        return cpu.cross_entropy_loss_grad(*arguments)
    if choice == COMPOSED:
        return composed.cross_entropy_loss_grad(*arguments)
    return ascend.cross_entropy_loss_grad(*arguments, vendor=choice)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction):  # pylint: disable=redefined-builtin
    """BCE with logits (arguments validated; ``reduction`` a name; ``weight`` / ``pos_weight``
    float32 tensors or None)."""
    choice = _bce_backend(input.shape, pos_weight is not None)
    if choice == CPU_KERNEL:
        return cpu.binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction)
    if choice == COMPOSED:
        return composed.binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                         reduction)
    return ascend.binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction,
                                                   vendor=choice)
