"""msrun worker of tests/test_mindformers_mcore.py: ms_xent's mcore loss under DATA_PARALLEL.

Launched as ``msrun --worker_num=2 --local_worker_num=2 ... mcore_data_parallel_worker.py OUT_DIR``.
The network is an output layer (logits = hidden @ weight^T, [rows, vocab], as GPTModel's output
layer before its loss) followed by :class:`McoreCrossEntropyLoss` with the TransformerConfig of a
data_parallel_size = 2 run. Each rank takes its half of the global batch (the same number of
counted rows in each half), runs one step of MindSpore's data-parallel training step without the
optimizer (forward, backward, the gradient reducer that averages over the ranks), GRAPH mode, and
saves its loss, the reduced weight gradient and its per-token (numerator, denominator) as
OUT_DIR/rank<r>.npz. :func:`single_process_reference` computes the same in one process on the
whole batch, with ms_xent's and with MindFormers' mcore loss.
"""

import os
import sys

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import functional as F

WORLD_SIZE = 2
ROWS, HIDDEN, VOCAB = 16, 8, 48
SEED = 11


def global_batch():
    """(hidden [ROWS, HIDDEN], labels [ROWS], mask [ROWS], weight [VOCAB, HIDDEN]), float32 /
    int32; each half of the rows has 6 counted rows."""
    rng = np.random.default_rng(SEED)
    hidden = rng.standard_normal((ROWS, HIDDEN)).astype(np.float32)
    labels = rng.integers(0, VOCAB, ROWS).astype(np.int32)
    mask = np.zeros(ROWS, np.float32)
    half = ROWS // WORLD_SIZE
    for rank in range(WORLD_SIZE):
        mask[rank * half + rng.choice(half, 6, replace=False)] = 1.0
    weight = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    return hidden, labels, mask, weight


def transformer_config(data_parallel_size, calculate_per_token_loss=False):
    from mindformers.parallel_core.transformer_config import TransformerConfig
    return TransformerConfig(num_attention_heads=1, num_layers=1,
                             data_parallel_size=data_parallel_size,
                             calculate_per_token_loss=calculate_per_token_loss)


class OutputLayerWithLoss(nn.Cell):
    """logits = hidden @ weight^T, then ``loss(logits, labels, mask)``."""

    def __init__(self, weight, loss):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(weight), name="output_weight")
        self.loss = loss

    def construct(self, hidden, labels, mask):
        logits = ops.matmul(hidden, self.weight.T)
        return self.loss(logits, labels, mask)


class GradientStep(nn.TrainOneStepCell):
    """MindSpore's TrainOneStepCell up to the reduced gradients (the optimizer is not applied):
    returns (loss, gradient of the output weight)."""

    def construct(self, *inputs):
        loss = self.network(*inputs)
        sens = F.fill(loss.dtype, loss.shape, self.sens)
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        grads = self.grad_reducer(grads)
        return loss, grads[0]


def loss_and_weight_grad(loss, hidden, labels, mask, weight):
    network = OutputLayerWithLoss(weight, loss)
    step = GradientStep(network, nn.SGD(network.trainable_params(), learning_rate=1.0))
    value, grad = step(ms.Tensor(hidden), ms.Tensor(labels), ms.Tensor(mask))
    return value.asnumpy(), grad.asnumpy()


def per_token_outputs(loss, hidden, labels, mask, weight):
    logits = ms.Tensor(hidden @ weight.T)
    numerator, denominator = loss(logits, ms.Tensor(labels), ms.Tensor(mask))
    return numerator.asnumpy(), denominator.asnumpy()


def single_process_reference():
    """The whole batch in this process (GRAPH mode): ms_xent's and MindFormers' mcore loss."""
    from mindformers.parallel_core.training_graph.loss_func import CrossEntropyLoss
    from ms_xent.mindformers.mcore_loss import McoreCrossEntropyLoss
    ms.set_context(mode=ms.GRAPH_MODE)
    hidden, labels, mask, weight = global_batch()
    loss, weight_grad = loss_and_weight_grad(McoreCrossEntropyLoss(transformer_config(1)),
                                             hidden, labels, mask, weight)
    mf_loss, mf_weight_grad = loss_and_weight_grad(CrossEntropyLoss(transformer_config(1)),
                                                   hidden, labels, mask, weight)
    numerator, denominator = per_token_outputs(
        McoreCrossEntropyLoss(transformer_config(1, calculate_per_token_loss=True)),
        hidden, labels, mask, weight)
    return {"loss": loss, "weight_grad": weight_grad, "mindformers_loss": mf_loss,
            "mindformers_weight_grad": mf_weight_grad, "numerator": numerator,
            "denominator": denominator}


def main(out_dir):
    from mindspore.communication import get_group_size, get_rank, init
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    rank, world_size = get_rank(), get_group_size()
    if world_size != WORLD_SIZE:
        raise RuntimeError(f"expected {WORLD_SIZE} workers, got {world_size}")
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                 gradients_mean=True, device_num=world_size)
    from ms_xent.mindformers.mcore_loss import McoreCrossEntropyLoss
    hidden, labels, mask, weight = global_batch()
    rows = slice(rank * ROWS // world_size, (rank + 1) * ROWS // world_size)
    local = (hidden[rows], labels[rows], mask[rows], weight)
    loss, weight_grad = loss_and_weight_grad(
        McoreCrossEntropyLoss(transformer_config(world_size)), *local)
    numerator, denominator = per_token_outputs(
        McoreCrossEntropyLoss(transformer_config(world_size, calculate_per_token_loss=True)),
        *local)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), loss=loss, weight_grad=weight_grad,
             numerator=numerator, denominator=denominator)


if __name__ == "__main__":
    main(sys.argv[1])
