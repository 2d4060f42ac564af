"""The Ascend path, tested as far as a CPU allows (there is no NPU here).

- Backend choice (ms_xent._backends.dispatch) for every option combination.
- The Ascend registration objects (ms_xent._backends.ascend.vendor_op) against the aclnn C prototypes:
  parameter count, order, names and C types (through MindSpore's own reg_info -> C type mapping
  and its own header parser), optional inputs, documented dtypes, output shapes and dtypes, and
  the positional call arguments. The prototypes and limits are the vendor documents' facts in
  tests/data/vendor_facts.json.
- The dispatch of the public API when the device is Ascend, simulated by patching the device
  target: vendor routes must reach the vendor primitive (which then fails on CPU, in PyNative at
  kernel lookup, in GRAPH_MODE only after the whole graph, bprop included, was built), composed
  routes must compute.
- The composed fallback (ms_xent._backends.composed) against the CPU kernels, float64 numpy and PyTorch:
  forward and gradient, options, float32 / bfloat16, PyNative and GRAPH_MODE.
"""

import functools
import glob
import itertools
import json
import os
import re

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn
from mindspore.ops.operations._custom_ops_utils import CustomCodeGenerator, CustomInfoGenerator

import ms_xent
from ms_xent._backends import composed
from ms_xent._backends import dispatch as backend
from ms_xent._backends.ascend import emulator
from ms_xent._backends.ascend import vendor_op as ascend_op
from ms_xent.ops import (binary_cross_entropy_with_logits, cross_entropy_loss,
                         cross_entropy_loss_grad, cross_entropy_rows)
from tests.reference import (IGNORE_INDEX, assert_close, assert_close_to_peak,
                             assert_matches_torch_float32, make_case, numpy_cross_entropy, rounded,
                             to_ms, to_numpy, torch_bce_with_logits)

REDUCTIONS = ("mean", "sum", "none")
# The vendor documents' facts (prototypes, torch_npu signature, limits), kept as test data.
with open(os.path.join(os.path.dirname(__file__), "data", "vendor_facts.json"),
          encoding="utf-8") as _facts:
    VENDOR_FACTS = json.load(_facts)

# ---- the aclnn prototypes ---------------------------------------------------------------------
# Parameters of aclnnXxxGetWorkspaceSize, from tests/data/vendor_facts.json.
PROTOTYPES = VENDOR_FACTS["aclnn_prototypes"]
# How many of the trailing aclTensor parameters are outputs (from the parameter tables).
N_OUTPUTS = VENDOR_FACTS["aclnn_output_count"]
HALF_AND_SINGLE = {"float16", "float32", "bfloat16"}
# Documented dtypes of each tensor parameter; "=x" means "the dtype of parameter x".
DOCUMENTED_DTYPES = {
    "aclnnCrossEntropyLoss": {
        "input": HALF_AND_SINGLE, "target": {"int64"}, "weightOptional": {"float32"},
        "lossOut": "=input", "logProbOut": "=input", "zlossOut": "=input",
        "lseForZlossOut": "=input"},
    "aclnnCrossEntropyLossGrad": {
        "gradLoss": HALF_AND_SINGLE, "logProb": "=gradLoss", "target": {"int64"},
        "weightOptional": {"float32"}, "gradZlossOptional": "=gradLoss",
        "lseForZlossOptional": "=gradLoss", "out": "=gradLoss"},
    "aclnnBinaryCrossEntropyWithLogits": {
        "self": HALF_AND_SINGLE, "target": "=self", "weightOptional": "=self",
        "posWeightOptional": "=self", "out": "=self"},
}
SPECS = {spec.symbol: spec for spec in ascend_op.ACLNN_SPECS}
C_TYPE_OF_PYTHON = {str: "char*", int: "int64_t", float: "double", bool: "bool"}


def parse_prototype(text):
    """[(C type, name)] of a C parameter list, `const` dropped, pointer stars kept on the type."""
    params = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s*(\**)\s*(\w+)\s*", part)
        params.append((match.group(1) + match.group(2), match.group(3)))
    return params


def operator_params(symbol):
    """The operator's own parameters (without workspaceSize and executor)."""
    params = parse_prototype(PROTOTYPES[symbol])
    assert [name for _, name in params[-2:]] == ["workspaceSize", "executor"]
    return params[:-2]


def mindspore_header_types(symbol):
    """The C types MindSpore reads from the CANN header on Ascend, by its own parser."""
    generator = CustomInfoGenerator(symbol)
    generator._get_aclnn_api_params = lambda: None  # pylint: disable=protected-access
    generator.aclnn_api = f"{symbol}GetWorkspaceSize({PROTOTYPES[symbol]});"
    return generator.get_aclnn_api_types()


def reg_info_names(reg_info):
    return ([entry["name"] for entry in reg_info["inputs"]]
            + [entry["name"] for entry in reg_info["attr"]]
            + [entry["name"] for entry in reg_info["outputs"]])


@pytest.mark.parametrize("symbol", sorted(PROTOTYPES))
def test_reg_info_matches_prototype(symbol):
    reg_info = ascend_op.ascend_reg_info(SPECS[symbol])
    params = operator_params(symbol)
    assert reg_info["op_name"] == symbol and reg_info["target"] == "Ascend"
    assert reg_info_names(reg_info) == [name for _, name in params], "names and order"
    assert len(reg_info["outputs"]) == N_OUTPUTS[symbol]
    # MindSpore maps every reg_info entry to a C type; it must be the prototype's type.
    registered_types = CustomCodeGenerator().get_api_types_by_reg_info(reg_info)[:-2]
    assert registered_types == [c_type for c_type, _ in params], "C types"
    assert mindspore_header_types(symbol)[:-2] == registered_types
    # What MindSpore checks when it builds the primitive on Ascend: the parameter count.
    callback = CustomCodeGenerator().generate_callback_by_types(
        symbol, reg_info, mindspore_header_types(symbol))
    assert f"extern \"C\" int {symbol}GetWorkSpaceSize" in callback
    optional = [entry["paramType"] == "optional" for entry in reg_info["inputs"]]
    assert optional == [entry["name"].endswith("Optional") for entry in reg_info["inputs"]]


@pytest.mark.parametrize("symbol", sorted(PROTOTYPES))
def test_reg_info_dtypes_are_the_documented_ones(symbol):
    reg_info = ascend_op.ascend_reg_info(SPECS[symbol])
    tensors = ([entry["name"] for entry in reg_info["inputs"]]
               + [entry["name"] for entry in reg_info["outputs"]])
    rows = [[dtype for dtype, _ in row] for row in reg_info["dtype_format"]]
    documented = DOCUMENTED_DTYPES[symbol]
    allowed_rows = [row for row in itertools.product(*(
        sorted(documented[name]) if isinstance(documented[name], set) else [None]
        for name in tensors))]
    expected = set()
    for row in allowed_rows:
        row = list(row)
        for index, name in enumerate(tensors):
            if not isinstance(documented[name], set):
                row[index] = row[tensors.index(documented[name][1:])]
        expected.add(tuple(row))
    assert {tuple(row) for row in rows} == expected
    assert all(fmt == "DefaultFormat" for row in reg_info["dtype_format"] for _, fmt in row)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_shapes_and_dtypes(reduction):
    n_rows, n_classes = 7, 11
    loss = [n_rows] if reduction == "none" else [1]
    shapes = ascend_op.cross_entropy_loss_out_shapes(reduction)(
        [n_rows, n_classes], [n_rows], [n_classes], [], [], [], [], [])
    # z-loss off (the only vendor mode): zlossOut and lseForZlossOut are empty tensors.
    assert shapes == (loss, [n_rows, n_classes], [0], [0])
    assert ascend_op.cross_entropy_loss_grad_out_shape(
        [], [n_rows, n_classes], [n_rows], [n_classes]) == [n_rows, n_classes]
    code = ascend_op.BCE_REDUCTION_VALUES[reduction]
    assert ascend_op.bce_with_logits_out_shape(code)([3, 4, 5], [3, 4, 5]) == (
        [3, 4, 5] if reduction == "none" else [1])
    for dtype in (ms.float32, ms.float16, ms.bfloat16):
        assert ascend_op.ACLNN_CROSS_ENTROPY_LOSS.out_dtype(dtype, ms.int64, ms.float32) == (
            dtype,) * 4
        assert ascend_op.ACLNN_CROSS_ENTROPY_LOSS_GRAD.out_dtype(dtype, dtype, ms.int64) == dtype
        assert ascend_op.ACLNN_BCE_WITH_LOGITS.out_dtype(dtype, dtype) == dtype


def c_type_of(argument):
    if argument is None or isinstance(argument, ms.Tensor):
        return "aclTensor*"
    return C_TYPE_OF_PYTHON[type(argument)]


def test_call_arguments_follow_the_prototypes():
    x = ms.Tensor(np.zeros((3, 4), np.float32))
    target = ms.Tensor(np.zeros(3, np.int64))
    weight = ms.Tensor(np.ones(4, np.float32))
    calls = {
        "aclnnCrossEntropyLoss": ascend_op.cross_entropy_loss_args(
            x, target, weight, "sum", IGNORE_INDEX, 0.1, 0.01, True),
        "aclnnCrossEntropyLossGrad": ascend_op.cross_entropy_loss_grad_args(
            ms.Tensor(1.0), x, target, None, "none", 3),
        "aclnnBinaryCrossEntropyWithLogits": ascend_op.bce_with_logits_args(
            x, x, None, weight, "mean"),
    }
    for symbol, arguments in calls.items():
        params = operator_params(symbol)[:-N_OUTPUTS[symbol]]
        assert [c_type_of(a) for a in arguments] == [c_type for c_type, _ in params], symbol
        for argument, (_, name) in zip(arguments, params):
            assert argument is not None or name.endswith("Optional"), (symbol, name)
    loss_args = calls["aclnnCrossEntropyLoss"]
    assert loss_args[3:] == ("sum", IGNORE_INDEX, 0.1, 0.01, True)
    assert calls["aclnnCrossEntropyLossGrad"][4:] == (None, None, "none", 3, 0.0, 0.0)
    assert calls["aclnnBinaryCrossEntropyWithLogits"][4] == 1  # "mean" is 1 for the vendor


def test_custom_primitives_build_on_cpu_without_touching_the_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MS_COMPILER_CACHE_PATH", raising=False)
    monkeypatch.setenv("MS_XENT_CACHE_DIR", str(tmp_path))
    forward = ascend_op.AclnnCrossEntropyLoss("sum")
    assert forward.func == "aclnnCrossEntropyLoss" and forward.multi_output
    assert forward.get_bprop() is not None
    grad = ascend_op.AclnnCrossEntropyLossGrad()
    assert grad.func == "aclnnCrossEntropyLossGrad" and not grad.multi_output
    bce = ascend_op.AclnnBinaryCrossEntropyWithLogits("mean")
    assert bce.func == "aclnnBinaryCrossEntropyWithLogits"
    assert os.environ["MS_COMPILER_CACHE_PATH"].startswith(str(tmp_path))


# ---- the vendor documents' facts ----------------------------------------------------------------

def test_limits_in_the_code_are_the_documented_ones():
    limits = VENDOR_FACTS["limits"]
    assert backend.VENDOR_MAX_ROWS == limits["grad_max_rows_exclusive"] - 1
    assert emulator.FORWARD_MAX_ROWS == limits["forward_max_rows"]
    assert emulator.GRAD_MAX_ROWS == limits["grad_max_rows_exclusive"] - 1
    assert {int(code): name for code, name in limits["bce_reduction_codes"].items()} == (
        ascend_op.BCE_REDUCTION_CODES)
    assert SPECS["aclnnCrossEntropyLoss"].dtype_rows[0][1] == limits["target_dtype"]
    assert {row[2] for row in SPECS["aclnnCrossEntropyLoss"].dtype_rows} == {
        limits["weight_dtype"]}


def snake(name):
    """aclnn parameter name -> torch_npu name: camelCase to snake_case, no Optional/Out suffix."""
    name = re.sub(r"(Optional|Out)$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_forward_prototype_matches_torch_npu_signature():
    match = re.search(r"npu_cross_entropy_loss\((.*?)\)\s*->\s*\((.*?)\)",
                      VENDOR_FACTS["torch_npu_signature"], re.S)
    seed_params = [re.fullmatch(r"\s*(\w+\??)\s+(\w+)(?:=.*)?\s*", part).groups()
                   for part in match.group(1).split(",")]
    params = operator_params("aclnnCrossEntropyLoss")
    inputs, outputs = params[:-4], params[-4:]
    torch_to_c = {"Tensor": "aclTensor*", "Tensor?": "aclTensor*", "str": "char*",
                  "int": "int64_t", "float": "double", "bool": "bool"}
    assert [(torch_to_c[t], n) for t, n in seed_params] == [(c, snake(n)) for c, n in inputs]
    assert match.group(2).split(", ") == ["Tensor"] * len(outputs)
    assert VENDOR_FACTS["torch_npu_outputs"] == [snake(name) for _, name in outputs]


# ---- backend choice ---------------------------------------------------------------------------

CHOICE_CASES = [
    # (device, options, builtin available, preference) -> backend
    ("CPU", {}, True, backend.ASCEND_BUILTIN, backend.CPU_KERNEL),
    ("CPU", {"soft_target": True, "zloss": True}, False, backend.ASCEND_ACLNN_CUSTOM,
     backend.CPU_KERNEL),
    ("CPU", {}, True, backend.COMPOSED, backend.COMPOSED),
    ("GPU", {}, True, backend.ASCEND_BUILTIN, backend.COMPOSED),
    ("Ascend", {}, True, backend.ASCEND_BUILTIN, backend.ASCEND_BUILTIN),
    ("Ascend", {"n_rows": 199999}, True, backend.ASCEND_BUILTIN, backend.ASCEND_BUILTIN),
    ("Ascend", {"n_rows": -1}, True, backend.ASCEND_BUILTIN, backend.ASCEND_BUILTIN),
    ("Ascend", {}, False, backend.ASCEND_BUILTIN, backend.ASCEND_ACLNN_CUSTOM),
    ("Ascend", {}, True, backend.ASCEND_ACLNN_CUSTOM, backend.ASCEND_ACLNN_CUSTOM),
    ("Ascend", {}, True, backend.COMPOSED, backend.COMPOSED),
    ("Ascend", {"n_rows": 200000}, True, backend.ASCEND_BUILTIN, backend.COMPOSED),
    ("Ascend", {"n_rows": 0}, True, backend.ASCEND_BUILTIN, backend.COMPOSED),
    ("Ascend", {"soft_target": True}, True, backend.ASCEND_BUILTIN, backend.COMPOSED),
    ("Ascend", {"weighted": True}, True, backend.ASCEND_BUILTIN, backend.COMPOSED),
    ("Ascend", {"label_smoothing": 0.1}, True, backend.ASCEND_ACLNN_CUSTOM, backend.COMPOSED),
    ("Ascend", {"zloss": True}, False, backend.ASCEND_BUILTIN, backend.COMPOSED),
]


def choice_arguments(preference):
    """The (requested backend, vendor variant) arguments of a preference: COMPOSED is
    MS_XENT_BACKEND=composed, a vendor backend MS_XENT_ASCEND_BACKEND under MS_XENT_BACKEND=auto."""
    if preference == backend.COMPOSED:
        return {"requested": backend.COMPOSED, "variant": backend.ASCEND_BUILTIN}
    return {"requested": backend.AUTO, "variant": preference}


@pytest.mark.parametrize("device,options,builtin,preference,expected", CHOICE_CASES)
def test_cross_entropy_backend_cases(device, options, builtin, preference, expected):
    assert backend.choose_cross_entropy_backend(
        device, builtin_available=builtin, **choice_arguments(preference), **options) == expected


def test_cross_entropy_backend_every_combination():
    """Every option combination: the vendor op is chosen exactly when it can serve the call."""
    for (device, soft, weighted, smoothing, zloss, n_rows, builtin, preference) in (
            itertools.product(("CPU", "Ascend", "GPU"), (False, True), (False, True), (0.0, 0.1),
                              (False, True), (-1, 0, 1, 199999, 200000, 10 ** 7), (False, True),
                              (backend.ASCEND_BUILTIN, backend.ASCEND_ACLNN_CUSTOM,
                               backend.COMPOSED))):
        choice = backend.choose_cross_entropy_backend(
            device, soft_target=soft, weighted=weighted, label_smoothing=smoothing, zloss=zloss,
            n_rows=n_rows, builtin_available=builtin, **choice_arguments(preference))
        servable = (not (soft or weighted or zloss) and smoothing == 0
                    and (n_rows < 0 or 0 < n_rows < 200000))
        if preference == backend.COMPOSED:
            assert choice == backend.COMPOSED
        elif device == "CPU":
            assert choice == backend.CPU_KERNEL
        elif device != "Ascend" or not servable:
            assert choice == backend.COMPOSED
        elif builtin and preference == backend.ASCEND_BUILTIN:
            assert choice == backend.ASCEND_BUILTIN
        else:
            assert choice == backend.ASCEND_ACLNN_CUSTOM


def test_bce_backend_every_combination():
    for device, n_elements, pos_weighted, builtin, preference in itertools.product(
            ("CPU", "Ascend", "GPU"), (-1, 0, 1, 10 ** 9), (False, True), (False, True),
            (backend.ASCEND_BUILTIN, backend.ASCEND_ACLNN_CUSTOM, backend.COMPOSED)):
        choice = backend.choose_bce_backend(device, n_elements=n_elements,
                                            pos_weighted=pos_weighted,
                                            builtin_available=builtin,
                                            **choice_arguments(preference))
        builtin_chosen = builtin and preference == backend.ASCEND_BUILTIN
        if preference == backend.COMPOSED:
            assert choice == backend.COMPOSED
        elif device == "CPU":
            assert choice == backend.CPU_KERNEL
        elif device != "Ascend" or n_elements == 0:
            assert choice == backend.COMPOSED
        elif builtin_chosen:
            assert choice == (backend.COMPOSED if pos_weighted else backend.ASCEND_BUILTIN)
        else:
            assert choice == backend.ASCEND_ACLNN_CUSTOM


def test_requested_backend_and_vendor_variant(monkeypatch):
    assert backend.device_target() == ms.get_context("device_target") == "CPU"
    monkeypatch.delenv(backend.BACKEND_VARIABLE, raising=False)
    assert backend.requested_backend() == backend.AUTO
    for value in ("cpu", " Composed", "ascend", "auto"):
        monkeypatch.setenv(backend.BACKEND_VARIABLE, value)
        assert backend.requested_backend() == value.strip().lower()
        with ms_xent.use_backend("composed"):
            assert backend.requested_backend() == backend.COMPOSED
            with ms_xent.use_backend("cpu"):
                assert backend.requested_backend() == backend.CPU_KERNEL
            assert backend.requested_backend() == backend.COMPOSED
        assert backend.requested_backend() == value.strip().lower()
    monkeypatch.setenv(backend.BACKEND_VARIABLE, "npu")
    with pytest.raises(ValueError, match="MS_XENT_BACKEND must be one of"):
        backend.requested_backend()
    with pytest.raises(ValueError, match="use_backend must be one of"):
        with ms_xent.use_backend("gpu"):
            pass
    for value, expected in (("builtin", backend.ASCEND_BUILTIN),
                            ("aclnn_custom", backend.ASCEND_ACLNN_CUSTOM)):
        monkeypatch.setenv(backend.VARIANT_VARIABLE, value)
        assert backend.ascend_variant() == expected
    monkeypatch.setenv(backend.VARIANT_VARIABLE, "composed")
    with pytest.raises(ValueError, match="MS_XENT_ASCEND_BACKEND=composed is now "
                                         "MS_XENT_BACKEND=composed"):
        backend.ascend_variant()
    monkeypatch.setenv(backend.VARIANT_VARIABLE, "npu")
    with pytest.raises(ValueError, match="MS_XENT_ASCEND_BACKEND must be one of"):
        backend.ascend_variant()
    monkeypatch.delenv(backend.VARIANT_VARIABLE)
    assert backend.ascend_variant() == backend.ASCEND_BUILTIN


@pytest.mark.parametrize("device", ["Ascend", "GPU"])
def test_every_public_api_off_cpu_selects_its_backend(device):
    """Per public API, the backend an automatic choice gives on a device other than CPU."""
    vendor = backend.ASCEND_BUILTIN if device == "Ascend" else backend.COMPOSED
    # cross_entropy_loss / cross_entropy_loss_grad: the vendor op where it serves the call
    assert backend.choose_cross_entropy_backend(device, n_rows=8) == vendor
    assert backend.choose_cross_entropy_backend(device, n_rows=8, zloss=True) == backend.COMPOSED
    # binary_cross_entropy_with_logits
    assert backend.choose_bce_backend(device, n_elements=8) == vendor
    # cross_entropy_rows, the Cells, vocab_parallel_cross_entropy_rows: the composed rows
    assert backend.choose_rows_backend(device) == backend.COMPOSED
    # linear_cross_entropy: row chunks over the composed rows
    assert backend.choose_linear_cross_entropy_backend(device) == (backend.MATMUL_CHUNKS,
                                                                   backend.COMPOSED)
    for api_choice in (backend.choose_rows_backend, backend.choose_bce_backend,
                       backend.choose_cross_entropy_backend,
                       backend.choose_linear_cross_entropy_backend):
        with pytest.raises(ValueError, match=f"MS_XENT_BACKEND=cpu needs device CPU, the "
                                             f"device is '{device}'"):
            api_choice(device, requested=backend.CPU_KERNEL)
        other = "GPU" if device == "Ascend" else "CPU"
        with pytest.raises(ValueError, match="MS_XENT_BACKEND=ascend needs device Ascend"):
            api_choice(other, requested=backend.ASCEND)


# ---- dispatch with the device target patched to Ascend ----------------------------------------

def constant(value):
    """A function returning ``value`` (a def, not a lambda: GRAPH_MODE parses it)."""
    def get():
        return value
    return get


@pytest.fixture(name="ascend")
def fixture_ascend(monkeypatch, tmp_path):
    """Makes ms_xent believe it runs on Ascend (MS_XENT_BACKEND=auto); returns a setter for the
    backend preference (a vendor variant, or COMPOSED for MS_XENT_BACKEND=composed)."""
    monkeypatch.setattr(backend, "device_target", constant("Ascend"))
    monkeypatch.setenv("MS_COMPILER_CACHE_PATH", str(tmp_path / "aclnn_callbacks"))
    monkeypatch.setattr(backend, "requested_backend", constant(backend.AUTO))
    monkeypatch.setattr(backend, "ascend_variant", constant(backend.ASCEND_BUILTIN))

    def prefer(choice):
        arguments = choice_arguments(choice)
        monkeypatch.setattr(backend, "requested_backend", constant(arguments["requested"]))
        monkeypatch.setattr(backend, "ascend_variant", constant(arguments["variant"]))
    return prefer


class LossCell(nn.Cell):
    def __init__(self, weight, options, output):
        super().__init__()
        self.weight = weight
        self.options = options
        self.output = output

    def construct(self, x, target):
        return cross_entropy_loss(x, target, self.weight, **self.options)[self.output].sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype", [np.int64, np.int32])
def test_vendor_route_reaches_the_builtin_primitive_pynative(ascend, reduction, target_dtype):
    x, t, _ = make_case(6, 5, seed=1, ignore_fraction=0.3)
    xt, tt = ms.Tensor(x), ms.Tensor(t.astype(target_dtype))
    with pytest.raises(RuntimeError, match="kernel CrossEntropyLoss unregistered"):
        cross_entropy_loss(xt, tt, reduction=reduction, ignore_index=IGNORE_INDEX)[0].asnumpy()
    grad_loss = ms.Tensor(np.ones(6, np.float32)) if reduction == "none" else ms.Tensor(1.0)
    with pytest.raises(RuntimeError, match="kernel CrossEntropyLossGrad unregistered"):
        cross_entropy_loss_grad(grad_loss, xt, tt, reduction=reduction).asnumpy()


def test_vendor_route_builds_the_builtin_graph_with_its_bprop(ascend):
    """GRAPH_MODE: the forward and MindSpore's bprop pass type/shape inference; only kernel
    selection fails (no CPU kernel for the vendor op)."""
    x, t, _ = make_case(6, 5, seed=2, ignore_fraction=0.3)
    ms.set_context(mode=ms.GRAPH_MODE)
    with pytest.raises(RuntimeError, match=r"Unsupported op \[CrossEntropyLoss\] on CPU"):
        ms.grad(LossCell(None, {"reduction": "mean"}, 0))(ms.Tensor(x), ms.Tensor(t))


def test_aclnn_custom_route_builds_forward_and_grad_customs(ascend, tmp_path):
    """GRAPH_MODE with MS_XENT_ASCEND_BACKEND=aclnn_custom: the forward Custom, its Python infer
    and its bprop (the gradient Custom) are built; the CPU kernel factory then refuses the aclnn
    name. The saved graph shows the gradient Custom with the vendor's arguments."""
    ascend(backend.ASCEND_ACLNN_CUSTOM)
    x, t, _ = make_case(6, 5, seed=3, ignore_fraction=0.3)
    graphs_path = ms.get_context("save_graphs_path")
    ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="'aclnnCrossEntropyLoss' is illegal"):
            ms.grad(LossCell(None, {"reduction": "sum", "ignore_index": 2}, 0))(
                ms.Tensor(x), ms.Tensor(t))
    finally:
        ms.set_context(save_graphs=0, save_graphs_path=graphs_path)
    graphs = "".join(open(path, encoding="utf-8").read()
                     for path in glob.glob(str(tmp_path / "**" / "*.ir"), recursive=True))
    # The vendor is always called with reduction "none" (ms_xent reduces and masks).
    assert re.search(r"= Custom\([^\n]*\"none\", I64\(2\), F32\(0\), F32\(0\), Bool\(0\)\)", graphs)
    assert re.search(r"= Custom\([^\n]*None, None, \"none\", I64\(2\), F32\(0\), F32\(0\)\)",
                     graphs), "the bprop's aclnnCrossEntropyLossGrad call"


def public_api(mode, x, target, weight, options, dtype):
    """Outputs of ms_xent.ops.cross_entropy_loss and d(sum loss)/dx, float64 numpy."""
    xt = to_ms(x, dtype)
    tt = ms.Tensor(target) if target.dtype.kind == "i" else to_ms(target, dtype)
    wt = None if weight is None else ms.Tensor(weight)
    if mode == "graph":
        ms.set_context(mode=ms.GRAPH_MODE)

    def summed(a, b):
        outputs = cross_entropy_loss(a, b, wt, **options)
        return outputs[0].astype(ms.float32).sum(), outputs

    (_, outputs), grad = ms.value_and_grad(summed, grad_position=0, has_aux=True)(xt, tt)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    loss, log_prob, zloss, lse = (to_numpy(value) for value in outputs)
    return {"loss": loss, "log_prob": log_prob, "zloss": zloss, "lse": lse,
            "grad": to_numpy(grad), "dtype": outputs[0].dtype}


def zloss_grad(x, target, weight, options):
    xt, tt = ms.Tensor(x), ms.Tensor(target)
    wt = None if weight is None else ms.Tensor(weight)
    return to_numpy(ms.grad(
        lambda a: cross_entropy_loss(a, tt, wt, **options)[2].sum())(xt))


# (weighted, ignored rows, label smoothing, z-loss): a two-level orthogonal array, every pair of
# settings of any two of the four options occurs; crossed with the three reductions.
PAIRWISE_ROWS = ((0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0))


def option_grid():
    for row, reduction in itertools.product(PAIRWISE_ROWS, REDUCTIONS):
        weighted, ignored, smoothed, zloss = row
        options = {"reduction": reduction, "label_smoothing": 0.1 * smoothed,
                   "lse_square_scale_for_zloss": 0.02 * zloss, "return_zloss": bool(zloss)}
        yield pytest.param(bool(weighted), 0.3 * ignored, options,
                           id=f"w{weighted}-ign{ignored}-eps{smoothed}-z{zloss}-{reduction}")


GRID = list(option_grid())
ALL_OPTIONS = {"reduction": "mean", "label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.02,
               "return_zloss": True}


def compare(composed_result, kernel_result, reference, options, dtype):
    assert composed_result["dtype"] == dtype
    for key in ("loss", "log_prob", "zloss", "lse"):
        assert composed_result[key].shape == kernel_result[key].shape, key
    assert_close(composed_result["loss"], kernel_result["loss"], dtype, "loss vs kernel")
    assert_close(composed_result["log_prob"], kernel_result["log_prob"], dtype, "log_prob")
    assert_close_to_peak(composed_result["grad"], kernel_result["grad"], dtype, "grad vs kernel",
                         reference["grad_unit"])
    assert_close(composed_result["loss"], reference["loss"], dtype, "loss vs numpy")
    assert_close_to_peak(composed_result["grad"], reference["grad"], dtype, "grad vs numpy",
                         reference["grad_unit"])
    if options.get("return_zloss"):
        assert_close(composed_result["zloss"], reference["zloss"], dtype, "zloss vs numpy")
    if options.get("lse_square_scale_for_zloss", 0.0) > 0:
        assert_close(composed_result["lse"], reference["lse"], dtype, "lse vs numpy")


def reference_for(x, target, weight, options, dtype):
    return numpy_cross_entropy(rounded(x, dtype), target, weight, options["reduction"],
                               IGNORE_INDEX, options["label_smoothing"],
                               options["lse_square_scale_for_zloss"])


@pytest.mark.parametrize("weighted,ignore_fraction,options", GRID)
def test_composed_route_float32_vs_kernel_numpy_torch(ascend, weighted, ignore_fraction, options):
    """Options (pairwise) x reductions through the public API on (simulated) Ascend with the
    composed backend forced: equal to the CPU kernel, float64 numpy and PyTorch, with gradients."""
    x, t, w = make_case(23, 257, seed=4, ignore_fraction=ignore_fraction)
    weight = w if weighted else None
    with pytest.MonkeyPatch.context() as on_cpu:
        on_cpu.setattr(backend, "device_target", constant("CPU"))
        kernel = public_api("pynative", x, t, weight, options, ms.float32)
    ascend(backend.COMPOSED)
    result = public_api("pynative", x, t, weight, options, ms.float32)
    compare(result, kernel, reference_for(x, t, weight, options, ms.float32), options, ms.float32)
    assert_matches_torch_float32(result, x, t, weight, options,
                                 lambda: zloss_grad(x, t, weight, options))


@pytest.mark.parametrize("mode,dtype,soft,options", [
    ("pynative", ms.bfloat16, False, ALL_OPTIONS),
    ("pynative", ms.bfloat16, True, {"reduction": "mean", "label_smoothing": 0.1,
                                     "lse_square_scale_for_zloss": 0.0, "return_zloss": False}),
    ("graph", ms.float32, False, dict(ALL_OPTIONS, reduction="none")),
    ("graph", ms.bfloat16, True, {"reduction": "sum", "label_smoothing": 0.0,
                                  "lse_square_scale_for_zloss": 0.01, "return_zloss": True}),
], ids=["bf16-all-options", "bf16-soft", "graph-f32-all-options", "graph-bf16-soft-zloss"])
def test_composed_route_dtypes_modes_and_soft_targets(ascend, mode, dtype, soft, options):
    x, t, w = make_case(19, 130, seed=5, ignore_fraction=0.0 if soft else 0.3, soft=soft)
    target = rounded(t, dtype) if soft else t
    with pytest.MonkeyPatch.context() as on_cpu:
        on_cpu.setattr(backend, "device_target", constant("CPU"))
        kernel = public_api("pynative", x, t, w, options, dtype)
    result = public_api(mode, x, t, w, options, dtype)  # weights: the composed route is chosen
    compare(result, kernel, reference_for(x, target, w, options, dtype), options, dtype)


class LossAndGrad(nn.Cell):
    """Loss and d loss / d logits of the public API in one graph."""

    def __init__(self, weight, options):
        super().__init__()
        self.loss = LossCell(weight, options, 0)
        self.grad = ms.value_and_grad(self.loss)

    def construct(self, x, target):
        return self.grad(x, target)


def test_composed_route_graph_dynamic_batch(ascend):
    """GRAPH_MODE with N unknown at compile time (set_inputs): the composed route (chosen for the
    class weights) compiles once and matches the kernel for two batch sizes."""
    options = dict(ALL_OPTIONS, reduction="mean")
    weight = ms.Tensor(make_case(1, 40, seed=16)[2])
    ms.set_context(mode=ms.GRAPH_MODE)
    net = LossAndGrad(weight, options)
    net.set_inputs(ms.Tensor(shape=[None, 40], dtype=ms.float32),
                   ms.Tensor(shape=[None], dtype=ms.int64))
    for n_rows in (7, 12):
        x, t, _ = make_case(n_rows, 40, seed=n_rows, ignore_fraction=0.3)
        loss, grad = net(ms.Tensor(x), ms.Tensor(t))
        with pytest.MonkeyPatch.context() as on_cpu:
            on_cpu.setattr(backend, "device_target", constant("CPU"))
            kernel = public_api("pynative", x, t, weight.asnumpy(), options, ms.float32)
        assert_close(loss, kernel["loss"], ms.float32, f"loss, N={n_rows}")
        assert_close_to_peak(grad, kernel["grad"], ms.float32, f"grad, N={n_rows}")


def test_all_ignored_mean_is_zero_with_zero_gradient(ascend):
    ascend(backend.COMPOSED)
    x, _, _ = make_case(5, 7, seed=6)
    t = np.full(5, IGNORE_INDEX, np.int64)
    options = {"reduction": "mean", "label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.02,
               "return_zloss": True}
    result = public_api("pynative", x, t, None, options, ms.float32)
    assert result["loss"] == 0 and result["zloss"] == 0
    np.testing.assert_array_equal(result["grad"], np.zeros_like(x))


@pytest.mark.parametrize("options", [
    {"reduction": "none", "lse_square_scale_for_zloss": 0.1, "return_zloss": True},
    {"reduction": "mean", "label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.1,
     "return_zloss": True}])
def test_ignored_rows_of_minus_inf_logits_match_kernel(ascend, options):
    """An ignored row whose logits are all -inf: loss, z-loss and gradient stay exactly those of
    the kernels (0 contribution, zero gradient); log_prob and lse report the row as it is."""
    ascend(backend.COMPOSED)
    x, t, w = make_case(6, 9, seed=15)
    x[2] = -np.inf
    t[2] = IGNORE_INDEX
    with pytest.MonkeyPatch.context() as on_cpu:
        on_cpu.setattr(backend, "device_target", constant("CPU"))
        kernel = public_api("pynative", x, t, w, options, ms.float32)
        kernel["zgrad"] = zloss_grad(x, t, w, options)
    result = public_api("pynative", x, t, w, options, ms.float32)
    result["zgrad"] = zloss_grad(x, t, w, options)
    assert np.isfinite(result["grad"]).all() and np.isfinite(result["zgrad"]).all()
    for key in ("loss", "zloss", "log_prob", "lse", "grad", "zgrad"):
        assert_close(result[key], kernel[key], ms.float32, key)


@pytest.mark.parametrize("soft,options", [
    (False, {"reduction": "mean", "label_smoothing": 0.1}),
    (False, {"reduction": "none", "label_smoothing": 0.0, "lse_square_scale_for_zloss": 0.05}),
    (True, {"reduction": "sum", "label_smoothing": 0.2}),
])
@pytest.mark.parametrize("dtype", [ms.float32, ms.bfloat16])
def test_composed_grad_route_vs_kernel(ascend, soft, options, dtype):
    """cross_entropy_loss_grad (from log_prob) on the composed route equals the CPU kernel's."""
    x, t, w = make_case(17, 90, seed=7, ignore_fraction=0.0 if soft else 0.3, soft=soft)
    zscale = options.get("lse_square_scale_for_zloss", 0.0)
    target = to_ms(t, dtype) if soft else ms.Tensor(t)
    rng = np.random.default_rng(8)
    shape = (17,) if options["reduction"] == "none" else ()
    grad_loss = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
    grad_zloss = ms.Tensor(rng.standard_normal(shape).astype(np.float32)) if zscale else None
    with pytest.MonkeyPatch.context() as on_cpu:
        on_cpu.setattr(backend, "device_target", constant("CPU"))
        _, log_prob, _, lse = cross_entropy_loss(to_ms(x, dtype), target, ms.Tensor(w),
                                                 lse_square_scale_for_zloss=zscale)

        def run():
            return to_numpy(cross_entropy_loss_grad(
                grad_loss, log_prob, target, ms.Tensor(w), grad_zloss, lse if zscale else None,
                **options))
        expected = run()
    actual = run()  # weights given: the composed route
    assert_close_to_peak(actual, expected, dtype, "composed grad vs kernel grad")


def test_cross_entropy_rows_route_vs_kernel(ascend):
    x, t, w = make_case(21, 66, seed=9, ignore_fraction=0.3)
    xt, tt, wt = ms.Tensor(x), ms.Tensor(t), ms.Tensor(w)

    def rows_and_grad():
        def total(a):
            loss_rows, lse, _ = cross_entropy_rows(a, tt, wt, IGNORE_INDEX, 0.1)
            return loss_rows.sum() + 0.5 * (lse * lse).sum()
        rows = cross_entropy_rows(xt, tt, wt, IGNORE_INDEX, 0.1)
        return [to_numpy(value) for value in rows] + [to_numpy(ms.grad(total)(xt))]
    with pytest.MonkeyPatch.context() as on_cpu:
        on_cpu.setattr(backend, "device_target", constant("CPU"))
        expected = rows_and_grad()
    for actual, wanted, what in zip(rows_and_grad(), expected,
                                    ("loss_rows", "lse", "row_weight", "grad")):
        assert_close(actual, wanted, ms.float32, what)


# ---- BCE with logits --------------------------------------------------------------------------

BCE_CASES = [
    # (shape, weight shape, pos_weight shape, reduction)
    ((7,), None, None, "mean"),
    ((5, 9), (9,), (9,), "none"),
    ((3, 4, 6), (4, 1), (6,), "sum"),
    ((2, 3), (2, 3), None, "mean"),
]


def bce_case(shape, weight_shape, pos_weight_shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    t = rng.random(shape).astype(np.float32)

    def factor(factor_shape):
        return None if factor_shape is None else (rng.random(factor_shape) * 2).astype(np.float32)
    return x, t, factor(weight_shape), factor(pos_weight_shape)


@pytest.mark.parametrize("dtype", [ms.float32, ms.bfloat16])
@pytest.mark.parametrize("shape,weight_shape,pos_weight_shape,reduction", BCE_CASES)
def test_composed_bce_and_closed_form_gradient_vs_torch(shape, weight_shape, pos_weight_shape,
                                                        reduction, dtype):
    x, t, w, pw = bce_case(shape, weight_shape, pos_weight_shape, seed=10)
    xt, tt = to_ms(x, dtype), to_ms(t, dtype)
    wt = None if w is None else ms.Tensor(w)
    pwt = None if pw is None else ms.Tensor(pw)
    loss, grad_x, grad_t = torch_bce_with_logits(rounded(x, dtype), rounded(t, dtype), w, pw,
                                                 reduction)
    actual = composed.binary_cross_entropy_with_logits(xt, tt, wt, pwt, reduction)
    assert actual.dtype == dtype and actual.shape == loss.shape
    assert_close(actual, loss, dtype, "loss")
    auto_x, auto_t = ms.grad(
        lambda a, b: composed.binary_cross_entropy_with_logits(a, b, wt, pwt, reduction)
        .astype(ms.float32).sum(), grad_position=(0, 1))(xt, tt)
    upstream = ms.Tensor(np.ones(loss.shape, np.float32))
    closed_x, closed_t = composed.binary_cross_entropy_with_logits_grad(
        upstream, xt, tt, wt, pwt, reduction)
    for what, value, expected in (("autodiff d/dx", auto_x, grad_x),
                                  ("autodiff d/dt", auto_t, grad_t),
                                  ("closed d/dx", closed_x, grad_x),
                                  ("closed d/dt", closed_t, grad_t)):
        assert value.dtype == dtype
        assert_close_to_peak(value, expected, dtype, what)


def test_aclnn_bce_bprop_vs_torch():
    """The bprop of the aclnn BCE Custom runs on CPU (it is composed): gradients vs PyTorch."""
    x, t, w, pw = bce_case((4, 6), (6,), (6,), seed=11)
    rng = np.random.default_rng(12)
    for reduction in REDUCTIONS:
        upstream = rng.standard_normal((4, 6) if reduction == "none" else (1,)).astype(np.float32)
        _, grad_x, grad_t = torch_bce_with_logits(x, t, w, pw, reduction,
                                                  upstream.reshape(() if reduction != "none"
                                                                   else (4, 6)))
        prim = ascend_op.AclnnBinaryCrossEntropyWithLogits(reduction)
        grads = prim.get_bprop()(ms.Tensor(x), ms.Tensor(t), ms.Tensor(w), ms.Tensor(pw),
                                 ascend_op.BCE_REDUCTION_VALUES[reduction], None,
                                 ms.Tensor(upstream))
        assert len(grads) == 5 and grads[4] == 0
        assert_close_to_peak(grads[0], grad_x, ms.float32, f"d/dx {reduction}")
        assert_close_to_peak(grads[1], grad_t, ms.float32, f"d/dt {reduction}")
        np.testing.assert_array_equal(to_numpy(grads[2]), np.zeros_like(w))


def bce_api(mode, x, t, w, pw, reduction, dtype=ms.float32):
    xt, tt = to_ms(x, dtype), to_ms(t, dtype)
    wt = None if w is None else ms.Tensor(w)
    pwt = None if pw is None else ms.Tensor(pw)
    if mode == "graph":
        ms.set_context(mode=ms.GRAPH_MODE)

    def summed(a, b):
        loss = binary_cross_entropy_with_logits(a, b, wt, pwt, reduction)
        return loss.astype(ms.float32).sum(), loss
    (_, loss), (grad_x, grad_t) = ms.value_and_grad(summed, grad_position=(0, 1), has_aux=True)(
        xt, tt)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return loss, grad_x, grad_t


@pytest.mark.parametrize("route,pos_weighted", [
    (backend.ASCEND_BUILTIN, False), (backend.COMPOSED, True)])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_bce_routes_vs_torch(ascend, monkeypatch, route, pos_weighted, mode):
    """On (simulated) Ascend, BCE goes to MindSpore's BCEWithLogitsLoss, which has a CPU kernel:
    the built-in route runs here for real (arguments, reduction, bprop for input and target);
    with pos_weight the composed route is chosen."""
    vendor_calls = []
    vendor = ascend_op.vendor_binary_cross_entropy_with_logits
    if mode == "pynative":  # a spy on the vendor route (GRAPH_MODE could not parse its append)
        def spy(*args):
            vendor_calls.append(args[-1])
            return vendor(*args)
        monkeypatch.setattr(ascend_op, "vendor_binary_cross_entropy_with_logits", spy)
    x, t, w, pw = bce_case((5, 8), (8,), (8,) if pos_weighted else None, seed=13)
    x[0, :3] = (-100.0, 40.0, 100.0)  # where MindSpore's own target gradient breaks (below)
    for reduction in REDUCTIONS:
        loss, grad_x, grad_t = bce_api(mode, x, t, w, pw, reduction)
        if mode == "pynative":
            assert vendor_calls == ([route] if route == backend.ASCEND_BUILTIN else [])
            vendor_calls.clear()
        expected, expected_x, expected_t = torch_bce_with_logits(x, t, w, pw, reduction)
        assert loss.shape == expected.shape
        assert_close(loss, expected, ms.float32, f"loss {reduction}")
        assert_close_to_peak(grad_x, expected_x, ms.float32, f"d/dx {reduction}")
        assert_close_to_peak(grad_t, expected_t, ms.float32, f"d/dt {reduction}")


def test_builtin_bce_target_gradient_with_pos_weight_is_unstable_in_mindspore_2_9():
    """Why BCE with pos_weight avoids the built-in route: MindSpore 2.9's bprop of
    BCEWithLogitsLoss returns inf target gradients at large |x| (here on CPU; the bprop expression
    is the same on every device). MindSpore 2.10 returns PyTorch's finite gradients; the route
    stays avoided while 2.9 is supported."""
    x = np.array([[-100.0, 16.0, 40.0]], np.float32)
    t = np.full_like(x, 0.3)
    pos_weight = np.full(3, 2.0, np.float32)
    builtin = ms.ops.auto_generate.BCEWithLogitsLoss("sum")
    _, grad_t = ms.grad(lambda a, b: builtin(a, b, None, ms.Tensor(pos_weight)), (0, 1))(
        ms.Tensor(x), ms.Tensor(t))
    _, _, expected_t = torch_bce_with_logits(x, t, None, pos_weight, "sum")
    assert np.isfinite(expected_t).all()
    if ms.__version__.startswith("2.9."):
        assert not np.isfinite(to_numpy(grad_t)).all()
    else:
        assert_close_to_peak(grad_t, expected_t, ms.float32, "d/dt of the built-in BCE")


def test_bce_empty_input_on_the_ascend_route(ascend):
    """Zero-size inputs take the composed route: "sum" 0, "mean" NaN (0/0, as in PyTorch)."""
    x = ms.Tensor(np.zeros((0, 3), np.float32))
    assert binary_cross_entropy_with_logits(x, x, reduction="sum").asnumpy() == 0
    assert np.isnan(binary_cross_entropy_with_logits(x, x, reduction="mean").asnumpy())
    assert binary_cross_entropy_with_logits(x, x, reduction="none").shape == (0, 3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_cross_entropy_route_matches_kernel(ascend, reduction):
    x, t, w = np.zeros((0, 5), np.float32), np.zeros(0, np.int64), np.ones(5, np.float32)
    options = dict(ALL_OPTIONS, reduction=reduction)
    with pytest.MonkeyPatch.context() as on_cpu:
        on_cpu.setattr(backend, "device_target", constant("CPU"))
        kernel = public_api("pynative", x, t, w, options, ms.float32)
    result = public_api("pynative", x, t, w, options, ms.float32)
    for key in ("loss", "log_prob", "zloss", "lse", "grad"):
        np.testing.assert_array_equal(result[key], kernel[key], err_msg=key)


def test_bce_aclnn_custom_route_builds_the_custom(ascend):
    ascend(backend.ASCEND_ACLNN_CUSTOM)
    x, t, w, pw = bce_case((3, 4), (4,), None, seed=14)
    ms.set_context(mode=ms.GRAPH_MODE)
    with pytest.raises(RuntimeError, match="'aclnnBinaryCrossEntropyWithLogits' is illegal"):
        bce_api("graph", x, t, w, pw, "mean")


# ---- the vendor emulator (ascend_emulated) and the Ascend rows ----------------------------------

def test_every_choice_on_the_emulated_and_ascend_rows():
    """Cross-entropy and per-row choices for every option: the vendor route exactly when the
    vendor serves the call (the emulated row follows the ascend table), composed otherwise."""
    for (request, soft, weighted, smoothing, zloss, n_rows, too_large, logit_map, half) in (
            itertools.product((backend.ASCEND, backend.ASCEND_EMULATED), (False, True),
                              (False, True), (0.0, 0.1), (False, True),
                              (-1, 0, 1, 199999, 200000), (False, True), (False, True),
                              (False, True))):
        device = "Ascend" if request == backend.ASCEND else "CPU"
        vendor = (backend.ASCEND_EMULATED if request == backend.ASCEND_EMULATED
                  else backend.ASCEND_BUILTIN)
        in_range = (n_rows < 0 or 0 < n_rows < 200000) and not too_large
        loss_choice = backend.choose_cross_entropy_backend(
            device, requested=request, soft_target=soft, weighted=weighted,
            label_smoothing=smoothing, zloss=zloss, n_rows=n_rows, logit_map=logit_map,
            ignore_index_too_large=too_large)
        servable = in_range and not (soft or weighted or smoothing or zloss or logit_map)
        assert loss_choice == (vendor if servable else backend.COMPOSED)
        rows_choice = backend.choose_cross_entropy_rows_backend(
            device, requested=request, soft_target=soft, weighted=weighted, logit_map=logit_map,
            half_precision=half, n_rows=n_rows, ignore_index_too_large=too_large)
        # Rows: smoothing and the z-loss (through lse) are composed around the vendor call;
        # half-precision logits go to composed (the vendor rounds loss and log_prob to them).
        rows_servable = in_range and not (soft or weighted or logit_map or half)
        assert rows_choice == (vendor if rows_servable else backend.COMPOSED)
    assert backend.choose_cross_entropy_rows_backend("CPU") == backend.CPU_KERNEL
    assert backend.choose_rows_backend("CPU", requested=backend.ASCEND_EMULATED) == (
        backend.COMPOSED)
    with pytest.raises(ValueError, match="MS_XENT_BACKEND=ascend_emulated needs device CPU"):
        backend.choose_cross_entropy_backend("Ascend", requested=backend.ASCEND_EMULATED)
    assert backend.choose_bce_backend("CPU", requested=backend.ASCEND_EMULATED,
                                      pos_weighted=True) == backend.ASCEND_EMULATED
    assert backend.choose_bce_backend("CPU", requested=backend.ASCEND_EMULATED,
                                      n_elements=0) == backend.COMPOSED


@pytest.fixture(name="emulated_calls")
def fixture_emulated_calls(monkeypatch):
    """Records every emulated aclnn call as (symbol, positional arguments); in GRAPH mode, where
    the operator is looked up once while the graph is built, as (symbol, host scalars)."""
    calls = []
    make = ascend_op._emulated_operator  # pylint: disable=protected-access

    # An lru_cache wrapper that caches nothing: GRAPH mode runs it as Python while compiling (as
    # the wrapped lookup), instead of parsing it into the graph.
    @functools.lru_cache(maxsize=0)
    def recording(symbol, reduction, host_values):
        operator = make(symbol, reduction, host_values)
        if ms.get_context("mode") == ms.GRAPH_MODE:
            calls.append((symbol, host_values))
            return operator

        def call(*tensors):
            calls.append((symbol, tensors + host_values))
            return operator(*tensors)
        return call
    monkeypatch.setattr(ascend_op, "_emulated_operator", recording)
    return calls


def test_each_emulated_vendor_call_gets_the_prototype_arguments(emulated_calls):
    """Every call the Ascend route makes (loss and its bprop, loss_grad, rows and their bprop, BCE)
    reaches the emulated operator with the prototype's arguments: count, order, C types (a None
    only for an Optional parameter) and the documented tensor dtypes."""
    x, t, _ = make_case(6, 5, seed=21, ignore_fraction=0.3)
    xt, tt = ms.Tensor(x), ms.Tensor(t)
    with ms_xent.use_backend("ascend_emulated"):
        ms.grad(lambda a: cross_entropy_loss(a, tt, reduction="mean")[0])(xt)
        cross_entropy_loss_grad(ms.Tensor(1.0), xt, tt, reduction="sum")
        ms.grad(lambda a: cross_entropy_rows(a, tt, label_smoothing=0.1)[1].sum())(xt)
        ms.grad(lambda a: binary_cross_entropy_with_logits(a, ms.ops.sigmoid(xt), None,
                                                           ms.Tensor(np.ones(5, np.float32))))(xt)
    symbols = [symbol for symbol, _ in emulated_calls]
    assert symbols.count("aclnnCrossEntropyLoss") == 2
    assert symbols.count("aclnnCrossEntropyLossGrad") == 3
    assert symbols.count("aclnnBinaryCrossEntropyWithLogits") == 1
    for symbol, arguments in emulated_calls:
        params = operator_params(symbol)[:-N_OUTPUTS[symbol]]
        assert [c_type_of(a) for a in arguments] == [c_type for c_type, _ in params], symbol
        documented = DOCUMENTED_DTYPES[symbol]
        for argument, (_, name) in zip(arguments, params):
            assert argument is not None or name.endswith("Optional"), (symbol, name)
            if isinstance(argument, ms.Tensor) and isinstance(documented[name], set):
                assert str(argument.dtype).lower() in documented[name], (symbol, name)


@pytest.mark.parametrize("case,message", [
    ("smoothing_in_grad", "labelSmoothing must be 0.0"),
    ("zloss", "zloss is not supported"),
    ("int32_target", "unsupported dtypes"),
    ("too_many_rows", r"N must be in \(0, 199999\]"),
    ("ignore_index_too_large", "ignoreIndex must be less than C"),
    ("string_reduction_code", "reduction must be a int"),
])
def test_emulator_refuses_what_the_vendor_refuses(case, message):
    x = ms.Tensor(np.zeros((4, 3), np.float32))
    t = ms.Tensor(np.zeros(4, np.int64))
    w = ms.Tensor(np.ones(3, np.float32))
    emulated = ascend_op.ASCEND_EMULATED
    calls = {
        "smoothing_in_grad": lambda: ascend_op.aclnn_gradient(emulated)(
            x, x, t, None, None, None, "none", -100, 0.1, 0.0),
        "zloss": lambda: ascend_op.aclnn_call(
            emulated, ascend_op.AclnnCrossEntropyLoss,
            ascend_op.cross_entropy_loss_args(x, t, w, "none", -100, 0.0, 0.1, True), "none"),
        "int32_target": lambda: ascend_op.aclnn_call(
            emulated, ascend_op.AclnnCrossEntropyLoss,
            ascend_op.cross_entropy_loss_args(x, t.astype(ms.int32), w, "none", -100), "none"),
        "too_many_rows": lambda: ascend_op.aclnn_gradient(emulated)(
            ms.Tensor(np.zeros(200000, np.float32)), ms.Tensor(np.zeros((200000, 3), np.float32)),
            ms.Tensor(np.zeros(200000, np.int64)), None, None, None, "none", -100, 0.0, 0.0),
        "ignore_index_too_large": lambda: ascend_op.aclnn_call(
            emulated, ascend_op.AclnnCrossEntropyLoss,
            ascend_op.cross_entropy_loss_args(x, t, w, "none", 3), "none"),
        "string_reduction_code": lambda: ascend_op.aclnn_call(
            emulated, ascend_op.AclnnBinaryCrossEntropyWithLogits, (x, x, None, None, "mean"),
            "mean"),
    }
    with pytest.raises(ValueError, match="ACLNN_ERR_PARAM_INVALID.*" + message):
        calls[case]()


def test_emulated_outputs_follow_the_contract():
    """Dtypes and shapes of the emulated outputs, zero-size z-loss outputs, the BCE output in the
    target's dtype."""
    x = ms.Tensor(np.random.default_rng(3).standard_normal((4, 3)), ms.bfloat16)
    t = ms.Tensor(np.array([0, 2, 1, 2], np.int64))
    w = ms.Tensor(np.ones(3, np.float32))
    for reduction, loss_shape in (("none", (4,)), ("sum", (1,)), ("mean", (1,))):
        outputs = ascend_op.aclnn_call(
            ascend_op.ASCEND_EMULATED, ascend_op.AclnnCrossEntropyLoss,
            ascend_op.cross_entropy_loss_args(x, t, w, reduction, -100), reduction)
        assert [o.shape for o in outputs] == [loss_shape, (4, 3), (0,), (0,)]
        assert {o.dtype for o in outputs} == {ms.bfloat16}
    grad = ascend_op.aclnn_gradient(ascend_op.ASCEND_EMULATED)(
        *ascend_op.cross_entropy_loss_grad_args(ms.Tensor(np.ones(4), ms.bfloat16), x, t, None,
                                                "none", -100))
    assert grad.shape == (4, 3) and grad.dtype == ms.bfloat16
    bce = ascend_op.aclnn_call(ascend_op.ASCEND_EMULATED,
                               ascend_op.AclnnBinaryCrossEntropyWithLogits,
                               ascend_op.bce_with_logits_args(x, x, None, None, "sum"), "sum")
    assert bce.shape == (1,) and bce.dtype == ms.bfloat16


def test_rows_lse_is_recovered_from_log_prob(emulated_calls):
    """The vendor rows' lse (from log_prob at the argmax column) matches float64, also for a row
    of -inf logits except one, a row of all -inf (lse = -inf) and ignored rows."""
    x, t, _ = make_case(5, 7, seed=22, ignore_fraction=0.0)
    x[1, 1:] = -np.inf
    x[2] = -np.inf
    t[2] = IGNORE_INDEX
    t[3] = IGNORE_INDEX
    with ms_xent.use_backend("ascend_emulated"):
        loss_rows, lse, row_weight = cross_entropy_rows(ms.Tensor(x), ms.Tensor(t))
    assert emulated_calls, "the vendor route was not taken"
    with np.errstate(divide="ignore"):
        expected_lse = np.log(np.exp(x.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(to_numpy(lse), expected_lse, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(row_weight), [1, 1, 0, 0, 1])
    assert to_numpy(loss_rows)[2] == 0 and to_numpy(loss_rows)[3] == 0


def test_selfcheck_runs_and_writes_markdown(tmp_path):
    from ms_xent import selfcheck  # pylint: disable=import-outside-toplevel
    path = tmp_path / "selfcheck.md"
    status = selfcheck.main(["--quick", "--only", "binary_cross", "--markdown", str(path)])
    text = path.read_text(encoding="utf-8")
    assert status == 0, text
    assert "vendor (Ascend) operators are EMULATED" in text
    for route in ("cpu kernels", "composed", "ascend_emulated"):
        assert f"| {route}" in text
    assert "9 passed, 0 failed." in text


class PublicApiLoss(nn.Cell):
    """A scalar from one public API on (x, target), for the emulated-call counts below."""

    def __init__(self, api, options):
        super().__init__()
        self.api = api
        self.options = options
        self.cell = {"CrossEntropyLoss": ms_xent.CrossEntropyLoss,
                     "BCEWithLogitsLoss": ms_xent.BCEWithLogitsLoss}.get(api, dict)(**options)

    def construct(self, x, target):
        if self.api == "cross_entropy_loss":
            return cross_entropy_loss(x, target, **self.options)[0].sum()
        if self.api == "cross_entropy_rows":
            rows = cross_entropy_rows(x, target, **self.options)
            return rows[0].sum() + (rows[1] * rows[1]).sum()
        if self.api == "cross_entropy":
            return ms_xent.ops.cross_entropy(x, target, **self.options)
        if self.api == "CrossEntropyLoss":
            outputs = self.cell(x, target)
            if self.options.get("calculate_per_token_loss"):
                return outputs[0] / outputs[1]
            return outputs.sum()
        if self.api == "linear_cross_entropy":
            return ms_xent.ops.linear_cross_entropy(x, x[:5], target, **self.options)
        bce_target = ms.ops.sigmoid(x)
        if self.api == "binary_cross_entropy_with_logits":
            return binary_cross_entropy_with_logits(x, bce_target, **self.options)
        return self.cell(x, bce_target)


CE_PAIR = {"aclnnCrossEntropyLoss": 1, "aclnnCrossEntropyLossGrad": 1}
BCE_ONE = {"aclnnBinaryCrossEntropyWithLogits": 1}
WEIGHT = ms.Tensor(np.linspace(0.5, 1.0, 5), ms.float32)
# (public API, options, emulated vendor calls of one forward + gradient): the vendor serves what
# the dispatch tables promise, the rest is composed (no call).
API_CALL_CASES = [
    ("cross_entropy_loss", {}, CE_PAIR),
    ("cross_entropy_loss", {"reduction": "none", "ignore_index": 3}, CE_PAIR),
    ("cross_entropy_loss", {"reduction": "sum", "label_smoothing": 0.1}, {}),
    ("cross_entropy_loss", {"weight": WEIGHT}, {}),
    ("cross_entropy_rows", {}, CE_PAIR),
    ("cross_entropy_rows", {"label_smoothing": 0.2, "ignore_index": 1}, CE_PAIR),
    ("cross_entropy_rows", {"logit_softcap": 5.0}, {}),
    ("cross_entropy", {"reduction": "sum"}, CE_PAIR),
    ("cross_entropy", {"label_smoothing": 0.1}, CE_PAIR),
    ("cross_entropy", {"weight": WEIGHT}, {}),
    ("CrossEntropyLoss", {}, CE_PAIR),
    ("CrossEntropyLoss", {"label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.01}, CE_PAIR),
    ("CrossEntropyLoss", {"calculate_per_token_loss": True, "reduction": "mean"}, CE_PAIR),
    ("CrossEntropyLoss", {"return_z_loss": False, "ignore_index": 0}, CE_PAIR),
    ("CrossEntropyLoss", {"weight": WEIGHT}, {}),
    ("CrossEntropyLoss", {"logit_scale": 0.5}, {}),
    # Row-chunked linear + cross-entropy needs the per-row state of a partial vocabulary, which
    # the vendor op does not expose: composed on the Ascend rows.
    ("linear_cross_entropy", {}, {}),
    ("binary_cross_entropy_with_logits", {"reduction": "sum"}, BCE_ONE),
    ("binary_cross_entropy_with_logits", {"pos_weight": WEIGHT}, BCE_ONE),
    ("BCEWithLogitsLoss", {"weight": WEIGHT}, BCE_ONE),
]


def check_emulated_calls(calls, api, options, expected):
    """One forward + gradient of ``api`` under ascend_emulated makes the ``expected`` emulated
    aclnn calls (symbol -> count) and gives a finite gradient."""
    x, t, _ = make_case(6, 5, seed=23, ignore_fraction=0.3)
    t[t == IGNORE_INDEX] = options.get("ignore_index", IGNORE_INDEX)
    with ms_xent.use_backend("ascend_emulated"):
        grad = ms.grad(PublicApiLoss(api, options))(ms.Tensor(x), ms.Tensor(t))
    assert np.all(np.isfinite(to_numpy(grad)))
    symbols = [symbol for symbol, _ in calls]
    assert {symbol: symbols.count(symbol) for symbol in set(symbols)} == expected


@pytest.mark.parametrize("api,options,expected", API_CALL_CASES,
                         ids=[f"{case[0]}-{'-'.join(case[1]) or 'default'}"
                              for case in API_CALL_CASES])
def test_each_public_api_reaches_the_emulated_vendor_call(emulated_calls, api, options, expected):
    """Under ascend_emulated, one forward + gradient of each public API makes exactly the
    emulated aclnn calls the dispatch tables promise for its options."""
    check_emulated_calls(emulated_calls, api, options, expected)


@pytest.mark.parametrize("api,options,expected", [
    ("CrossEntropyLoss", {"label_smoothing": 0.1, "lse_square_scale_for_zloss": 0.01}, CE_PAIR),
    ("BCEWithLogitsLoss", {"weight": WEIGHT}, BCE_ONE),
], ids=["CrossEntropyLoss", "BCEWithLogitsLoss"])
def test_cells_reach_the_emulated_vendor_call_in_graph_mode(emulated_calls, api, options,
                                                            expected):
    """As above in GRAPH mode, where each operator is looked up once while the graph is built."""
    ms.set_context(mode=ms.GRAPH_MODE)
    check_emulated_calls(emulated_calls, api, options, expected)


class CellLossSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.loss = ms_xent.CrossEntropyLoss(reduction="none", label_smoothing=0.1)

    def construct(self, x, target):
        return self.loss(x, target).sum()


def test_vendor_rows_give_nan_for_out_of_range_targets_in_graph_mode(emulated_calls):
    """Target values are unknown when a graph compiles: on the vendor route (which must never see
    an out-of-range target) such a row gets a NaN loss and a NaN gradient row, as on every
    backend; the other rows are unaffected."""
    ms.set_context(mode=ms.GRAPH_MODE)
    x = ms.Tensor(np.random.default_rng(24).standard_normal((5, 3)).astype(np.float32))
    target = ms.Tensor(np.array([0, 1, 7, -2, 0], np.int64))
    with ms_xent.use_backend("ascend_emulated"):
        loss = to_numpy(CellLossSum()(x, target))
        grad = to_numpy(ms.grad(CellLossSum())(x, target))
    assert emulated_calls, "the vendor route was not taken"
    bad = np.array([False, False, True, True, False])
    assert np.isnan(loss)
    assert np.all(np.isnan(grad[bad])) and np.all(np.isfinite(grad[~bad]))


def test_selfcheck_ignore_index_case_passes_on_every_route(monkeypatch):
    """The full self-check's "sum, ignore_index" case (not in --quick) gives its routes valid
    targets (the default-ignored rows become ignore_index rows) and passes on every CPU route."""
    from ms_xent import selfcheck  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(selfcheck, "CROSS_ENTROPY_OPTIONS", {
        "sum, ignore_index": selfcheck.CROSS_ENTROPY_OPTIONS["sum, ignore_index"]})
    rows = selfcheck.run(only="cross_entropy_loss")
    assert len(rows) == 9 and {row["status"] for row in rows} == {"pass"}, rows
