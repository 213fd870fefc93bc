"""One gradient sample per parameter per micro-batch, however autograd delivers the gradient.

VRGD.md §1 takes the gradient of one micro-batch as one sample g_s and needs Σ g_s². A tensor
hook on a parameter usually fires once per backward pass with that whole gradient, but not
always: with *reentrant* activation checkpointing (``torch.utils.checkpoint(...,
use_reentrant=True)``) each checkpointed segment is back-propagated by a nested backward pass,
and a parameter used in two segments (a shared module) gets its gradient in two pieces, one per
nested pass. Squaring each piece would count one micro-batch as several samples and give
Σ(pieces²) instead of (Σ pieces)².

What a micro-batch is (the rule all moment sources share):

* one *outermost* backward pass — ``loss.backward()`` in plain PyTorch, ``engine.backward(loss)``
  under DeepSpeed (which calls it). Its end is detected with the autograd engine's final
  callback of that pass.
* A piece that arrives inside a nested backward pass (a custom ``autograd.Function``'s
  ``backward`` running its own backward, as reentrant checkpointing does) is summed, in fp32,
  with the other pieces of the same parameter until the outermost pass ends; then the sum is
  handed on as the sample. Pieces from the outermost pass itself are handed on at once (the
  engine has already summed every use of a parameter within one pass), so ordinary training
  pays nothing.
* The one case that cannot be made exact is refused with an error: a parameter whose gradient
  arrives first from the outermost pass and later from a nested pass of the same micro-batch
  (its first piece was already squared).

Cost with reentrant checkpointing: an fp32 buffer the size of each parameter that gets a piece
in a nested pass, held from its first piece to the end of the backward pass.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor
from torch.autograd import Variable
from torch.autograd.function import BackwardCFunction

__all__ = ["MicroBatchSamples"]

Sink = Callable[[Tensor], None]

# The frame of an autograd.Function's backward (a "PyNode") being run by the engine. A tensor
# hook that fires while such a frame is on the thread's stack runs in a nested backward pass.
_FUNCTION_BACKWARD_CODE = BackwardCFunction.apply.__code__


def _outermost_function_node(skip: int = 2):
    """The autograd node (a custom Function's backward) that started the outermost nested
    backward pass we are in, or None when this is not a nested pass (``skip``: our own frames)."""
    node = None
    frame = sys._getframe(skip)
    while frame is not None:
        if frame.f_code is _FUNCTION_BACKWARD_CODE:
            node = frame.f_locals.get("self")
        frame = frame.f_back
    return node


class MicroBatchSamples:
    """Turns the gradient pieces of every backward pass into one sample per micro-batch.

    ``hook(p, sink)`` returns a tensor hook for ``p``; ``sink(g)`` is then called once per
    micro-batch in which ``p`` got a gradient, with that micro-batch's whole gradient of ``p``.
    Sinks are called in the order the parameters' first pieces arrived (the same on every rank
    that runs the same graph, which collective-issuing sinks rely on).

    Args:
        names: ``{id(param): name}`` for error messages.
    """

    def __init__(self, names: dict[int, str] | None = None):
        self.names = names or {}
        self._pending: dict[int, tuple[Tensor, Sink]] = {}
        self._delivered: set[int] = set()
        self._end_scheduled = False
        #: Called after each micro-batch's pieces are handed on (sinks that batch their samples).
        self.after_end: list[Callable[[], None]] = []
        # (graph task id, its outermost Function node): whether a pass is nested does not change
        # while it runs, so the stack is walked once per backward pass, not once per parameter.
        self._task_node: tuple[int, object] = (-1, None)

    def hook(self, p: Tensor, sink: Sink):
        def hook(grad: Tensor) -> None:
            self.add(p, grad, sink)

        return hook

    def _node_of_current_pass(self):
        task = torch._C._current_graph_task_id()
        if self._task_node[0] != task:
            self._task_node = (task, _outermost_function_node(skip=3))
        return self._task_node[1]

    def add(self, p: Tensor, grad: Tensor, sink: Sink) -> None:
        node = self._node_of_current_pass()
        key = id(p)
        if node is None and key not in self._pending:
            self._schedule_end(None)
            self._delivered.add(key)
            sink(grad)
            return
        if key in self._delivered:
            name = self.names.get(key, f"a parameter of shape {tuple(p.shape)}")
            raise RuntimeError(
                f"vrgd_ds: {name} received part of its gradient in the outer backward pass and part in a "
                "nested one (reentrant activation checkpointing) within one micro-batch, so its gradient sample "
                "cannot be formed exactly. Use torch.utils.checkpoint(..., use_reentrant=False), or checkpoint "
                "every use of this parameter, or none."
            )
        self._schedule_end(node)
        entry = self._pending.get(key)
        if entry is None:
            dtype = torch.complex64 if grad.is_complex() else torch.float32
            self._pending[key] = (grad.detach().to(dtype, copy=True), sink)
        else:
            entry[0].add_(grad.detach())

    def _schedule_end(self, node) -> None:
        if self._end_scheduled:
            return
        self._end_scheduled = True
        if node is None:
            Variable._execution_engine.queue_callback(self.end_micro_batch)
            return
        # In a nested pass the engine's callback would run at the end of the nested pass: run
        # it after the outer node instead, from where it is queued on the outer pass.
        handles = []

        def after_outer_node(grad_inputs, grad_outputs):
            handles[0].remove()
            outer = _outermost_function_node()
            self._end_scheduled = False
            self._schedule_end(outer)

        handles.append(node.register_hook(after_outer_node))

    def end_micro_batch(self) -> None:
        """Hand on the summed pieces; called at the end of the outermost backward pass (and by
        the sources before they use the moments, in case a backward pass raised)."""
        pending, self._pending = self._pending, {}
        self._delivered.clear()
        self._end_scheduled = False
        for g, sink in pending.values():
            sink(g)
        for done in self.after_end:
            done()

    def discard(self) -> None:
        """Forget pieces not handed on yet (the step's samples are being thrown away)."""
        self._pending = {}
        self._delivered.clear()
        self._end_scheduled = False
