"""ms_xent.ops.cross_entropy (PyTorch's F.cross_entropy signature) against PyTorch float64:
layouts (C,), (N, C), (N, C, d1), (N, C, d1, d2), class-index and probability targets, class
weights, ignore_index, label smoothing, the three reductions, both modes and the three dtypes;
gradients w.r.t. the input and w.r.t. probability targets."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from ms_xent.ops import cross_entropy
from tests.reference import DTYPES, assert_close, assert_close_to_peak, rounded, to_ms

pytestmark = pytest.mark.usefixtures("backend")

C = 7
SHAPES = {"C": (C,), "NC": (5, C), "NCd": (3, C, 4), "NCdd": (2, C, 3, 2)}
# (name, weighted, ignore_index, label_smoothing, ignored fraction of class-index targets)
OPTIONS = {
    "plain": (False, -100, 0.0, 0.0),
    "weighted-smoothed-ignored": (True, -100, 0.1, 0.3),
    "ignore-a-class": (True, 2, 0.0, 0.0),
}


def make_inputs(shape, soft, ignore_index, ignored_fraction, seed):
    """float32 logits of ``shape`` (classes at dim 1, or dim 0 for (C,)), a target (class
    indices, some ``ignore_index``, or probabilities of the input's shape) and weights [C]."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    class_axis = 0 if len(shape) == 1 else 1
    if soft:
        t = rng.random(shape).astype(np.float32)
        t /= t.sum(axis=class_axis, keepdims=True)
    else:
        target_shape = shape[:class_axis] + shape[class_axis + 1:]
        t = np.asarray(rng.integers(0, C, target_shape), np.int64)
        if ignore_index < 0 and t.ndim:
            t[rng.random(target_shape) < ignored_fraction] = ignore_index
    w = (rng.random(C) + 0.25).astype(np.float32)
    return x, t, w


def torch_oracle(x, t, w, ignore_index, reduction, label_smoothing):
    """PyTorch float64: (loss, d sum(loss)/d input, d sum(loss)/d target or None)."""
    import torch
    import torch.nn.functional as F
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    soft = t.dtype.kind == "f"
    tt = torch.tensor(np.asarray(t, np.float64), requires_grad=True) if soft else torch.tensor(t)
    wt = None if w is None else torch.tensor(np.asarray(w, np.float64))
    loss = F.cross_entropy(xt, tt, wt, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    grads = torch.autograd.grad(loss.sum(), (xt, tt) if soft else (xt,))
    return (loss.detach().numpy(), grads[0].numpy(),
            grads[1].numpy() if soft else None)


class Loss(nn.Cell):
    """cross_entropy in a Cell (GRAPH mode needs one to differentiate the aot kernels)."""

    def __init__(self, weight, ignore_index, reduction, label_smoothing, summed):
        super().__init__()
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.summed = summed

    def construct(self, x, t):
        loss = cross_entropy(x, t, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing)
        return loss.astype(ms.float32).sum() if self.summed else loss


def check(shape, soft, options, reduction, mode="pynative", dtype=ms.float32, seed=0):
    weighted, ignore_index, label_smoothing, ignored = OPTIONS[options]
    x, t, w = make_inputs(shape, soft, ignore_index, ignored, seed)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    xt = to_ms(x, dtype)
    tt = to_ms(t, dtype) if soft else ms.Tensor(t)
    weight = ms.Tensor(w) if weighted else None
    arguments = (weight, ignore_index, reduction, label_smoothing)
    loss = Loss(*arguments, summed=False)(xt, tt)
    grads = ms.grad(Loss(*arguments, summed=True), grad_position=(0, 1) if soft else 0)(xt, tt)
    grad_x, grad_t = grads if soft else (grads, None)

    want, want_x, want_t = torch_oracle(rounded(x, dtype), rounded(t, dtype) if soft else t,
                                        w if weighted else None, ignore_index, reduction,
                                        label_smoothing)
    assert loss.dtype == dtype
    assert loss.shape == want.shape
    assert grad_x.shape == x.shape
    assert_close(loss, want, dtype, "loss", scale=4)
    assert_close_to_peak(grad_x, want_x, dtype, "d loss / d input")
    if soft:
        assert grad_t.shape == t.shape
        assert_close_to_peak(grad_t, want_t, dtype, "d loss / d target")


LAYOUT_GRID = [(shape, soft, options, reduction)
               for shape in SHAPES for soft in (False, True)
               for options in OPTIONS if not (soft and OPTIONS[options][1] != -100)
               for reduction in ("mean", "sum", "none")]


@pytest.mark.parametrize("shape,soft,options,reduction", LAYOUT_GRID,
                         ids=[f"{s}-{'soft' if p else 'index'}-{o}-{r}"
                              for s, p, o, r in LAYOUT_GRID])
def test_layouts_and_options_vs_torch_float64(shape, soft, options, reduction):
    check(SHAPES[shape], soft, options, reduction)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_modes_and_dtypes_vs_torch_float64(mode, dtype_name, soft):
    check(SHAPES["NCdd"], soft, "weighted-smoothed-ignored", "mean", mode, DTYPES[dtype_name],
          seed=1)
    check(SHAPES["C"], soft, "weighted-smoothed-ignored", "none", mode, DTYPES[dtype_name],
          seed=2)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_every_position_ignored_gives_zero_with_zero_gradient(mode):
    """The one deliberate difference from PyTorch (which returns NaN): a zero "mean" denominator
    gives 0 and a zero gradient."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    x = ms.Tensor(np.random.default_rng(3).standard_normal((2, C, 3)).astype(np.float32))
    t = ms.Tensor(np.full((2, 3), -100, np.int64))
    arguments = (None, -100, "mean", 0.0)
    assert Loss(*arguments, summed=False)(x, t).asnumpy() == 0.0
    grad = ms.grad(Loss(*arguments, summed=True))(x, t).asnumpy()
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


BAD_LAYOUTS = [
    ("0-d input", (), (), np.int64, ValueError, "`input`"),
    ("index target with the class axis", (4, C, 3), (4, C, 3), np.int64, ValueError, "`target`"),
    ("index target of the wrong batch", (4, C, 3), (4, 2), np.int64, ValueError, "(4, 3)"),
    ("unbatched index target not 0-d", (C,), (1,), np.int64, ValueError, "`target`"),
    ("probability target of another shape", (4, C), (4, C + 1), np.float32, ValueError,
     "`target`"),
    ("bool target", (4, C), (4,), np.bool_, TypeError, "`target`"),
]


@pytest.mark.parametrize("case", BAD_LAYOUTS, ids=[case[0] for case in BAD_LAYOUTS])
def test_bad_layout_raises_naming_the_argument(case):
    _, input_shape, target_shape, target_dtype, error, text = case
    x = ms.Tensor(np.zeros(input_shape, np.float32))
    t = ms.Tensor(np.zeros(target_shape, target_dtype))
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        cross_entropy(x, t)
