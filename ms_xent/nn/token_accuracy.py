"""Token accuracy during training: a Callback reading what the loss Cells recorded.

``CrossEntropyLoss(record_token_accuracy=True)`` stores each call's token accuracy in its
Parameter ``last_token_accuracy`` (an in-graph assign, so it works in GRAPH mode and inside
``Model.train`` / MindFormers' Trainer, where the loss Cell must return the loss alone). After a
step, :class:`TokenAccuracyMonitor` reads it: one 4-byte read per step, no extra pass over the
logits (the argmax comes from the loss kernel's forward pass).
"""

from mindspore.train import Callback

PARAMETER_NAME = "last_token_accuracy"


def token_accuracy_parameters(network):
    """The ``last_token_accuracy`` Parameters of the loss Cells inside ``network``."""
    return [param for param in network.get_parameters()
            if param.name.split(".")[-1] == PARAMETER_NAME]


def recorded_token_accuracy(parameters):
    """The mean of the recorded accuracies (one per loss Cell), or None without any."""
    if not parameters:
        return None
    return sum(float(param.asnumpy()) for param in parameters) / len(parameters)


class TokenAccuracyMonitor(Callback):
    """Collects (and optionally prints) the token accuracy of every training step.

    Args:
        print_fn: called with a line per step (e.g. ``print``); None collects only.

    ``accuracies`` holds one float per step. Raises RuntimeError at the start of training when
    the network has no loss Cell with ``record_token_accuracy=True`` (nothing would be logged).
    """

    def __init__(self, print_fn=None):
        super().__init__()
        self.print_fn = print_fn
        self.accuracies = []
        self._parameters = []

    def on_train_begin(self, run_context):
        self._parameters = token_accuracy_parameters(run_context.original_args().train_network)
        if not self._parameters:
            raise RuntimeError("TokenAccuracyMonitor: the network has no loss Cell recording the "
                               "token accuracy; build ms_xent.nn.CrossEntropyLoss with "
                               "record_token_accuracy=True")

    def on_train_step_end(self, run_context):
        accuracy = recorded_token_accuracy(self._parameters)
        self.accuracies.append(accuracy)
        if self.print_fn is not None:
            self.print_fn(f"step {len(self.accuracies)}  token accuracy {accuracy:.4f}")
