"""Per-tensor reductions over tensors the optimizer sees, whole or as flat ZeRO shards.

In plain PyTorch (and DeepSpeed ZeRO stage 0) every tensor the optimizer updates *is* one
parameter tensor. Under ZeRO 1/2 the optimizer updates one flat fp32 partition per param
group, holding pieces of several parameter tensors (a tensor may straddle two ranks'
partitions) and padding at the end of the last rank's partition. Per-tensor quantities
(VRGD's layer mean of r, LAMB/LARS norms) are then segmented sums over the local pieces,
completed by one all-reduce over the data-parallel group — never sums over a flat shard. (The
copies of a weight tied across pipeline stages, cut at other elements on each stage, then agree
on their sums over the tie group too: :func:`vrgd_ds.comm.agree_over_ties`.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SegmentLayout", "HeldElements"]

PADDING = -1
# State keys holding one value per parameter tensor (not per element) of a flat shard.
PER_TENSOR_STATE = ("tensor_step",)
#: Pieces shorter than this are handled together, one operation per run of consecutive small
#: pieces (a flat shard of a transformer holds hundreds of biases and LayerNorm weights: one op
#: each costs more than their elements). torch runs ops on fewer elements than its grain size
#: (32768) on one thread anyway, so nothing is lost in parallelism.
SMALL_PIECE = 32768


class _Run:
    """Consecutive small pieces [start, end) of a flat tensor, handled by one op each time;
    ``keys`` per piece, ``lengths`` per piece (the per-element tensor index, ``element_keys``,
    is made per device)."""

    __slots__ = ("start", "end", "keys", "lengths")

    def __init__(self, start: int, end: int, keys: list[int], lengths: list[int]):
        self.start, self.end, self.keys, self.lengths = start, end, keys, lengths


class SegmentLayout:
    """How a flat tensor splits into consecutive pieces of original parameter tensors.

    Args:
        piece_lengths: lengths of consecutive pieces covering the whole flat tensor.
        piece_keys: for each piece, the index of the parameter tensor it belongs to
            (0 .. num_tensors-1, consistent on every rank), or -1 for padding.
        tensor_numels: J of every parameter tensor (its full size, all ranks together).
        names: optional name of every parameter tensor (for statistics).
        complete: ``complete(vector)`` sums a float vector over the ranks that share the
            tensors, in place (an all-reduce; then, for tensors tied across pipeline stages, the
            same bits on every copy); ``None`` when every tensor is whole locally.

    Per-tensor operations go piece by piece over large pieces and one op per run of small
    ones (:data:`SMALL_PIECE`); padding is never touched by them.
    """

    def __init__(
        self,
        piece_lengths: Sequence[int],
        piece_keys: Sequence[int],
        tensor_numels: Sequence[int],
        names: Sequence[str] | None = None,
        complete: Callable[[Tensor], None] | None = None,
    ):
        if len(piece_lengths) != len(piece_keys):
            raise ValueError("piece_lengths and piece_keys must have the same length")
        self.piece_lengths = list(int(n) for n in piece_lengths)
        self.piece_keys = list(int(k) for k in piece_keys)
        self.numel = sum(self.piece_lengths)
        self.num_tensors = len(tensor_numels)
        self.tensor_numels = torch.tensor(list(tensor_numels), dtype=torch.float32)
        self.names = list(names) if names is not None else [str(i) for i in range(self.num_tensors)]
        self.complete = complete
        self.is_whole = self.piece_keys == [0] and self.num_tensors == 1 and complete is None
        self._device = None
        self._plan()

    @classmethod
    def whole(cls, numel: int, name: str | None = None) -> "SegmentLayout":
        """The layout of an ordinary parameter tensor: one piece, complete locally."""
        return cls([numel], [0], [numel], names=[name] if name is not None else None)

    def _plan(self) -> None:
        """Split the non-padding pieces into large ones (one op each) and runs of small ones."""
        self._large: list[tuple[int, int, int]] = []
        self._runs: list[_Run] = []
        run: list[tuple[int, int, int]] = []

        def close():
            if len(run) == 1:
                self._large.append(run[0])
            elif run:
                self._runs.append(_Run(run[0][1], run[-1][2], [k for k, _, _ in run], [b - a for _, a, b in run]))
            run.clear()

        for key, a, b in self._pieces():
            if b == a:
                continue
            if b - a >= SMALL_PIECE:
                close()
                self._large.append((key, a, b))
            else:
                if run and run[-1][2] != a:  # padding in between
                    close()
                run.append((key, a, b))
        close()

    def _index_tensors(self, device):
        if self._device != device:
            self._lengths_t = torch.tensor(self.piece_lengths, dtype=torch.long, device=device)
            keys = torch.tensor(self.piece_keys, dtype=torch.long, device=device)
            self._valid = keys >= 0
            self._keys_t = keys.clamp(min=0)
            self._large_keys_t = torch.tensor([k for k, _, _ in self._large], dtype=torch.long, device=device)
            self._run_keys_t = [
                torch.repeat_interleave(
                    torch.tensor(r.keys, dtype=torch.long, device=device),
                    torch.tensor(r.lengths, dtype=torch.long, device=device),
                )
                for r in self._runs
            ]
            self._device = device
        return self._lengths_t, self._keys_t, self._valid

    def pieces(self):
        """(tensor index, start, end) of every non-padding piece of the flat tensor."""
        return self._pieces()

    def _pieces(self):
        start = 0
        for length, key in zip(self.piece_lengths, self.piece_keys):
            if key >= 0:
                yield key, start, start + length
            start += length

    def local_sums(self, values: Sequence[Tensor], squares: bool = False) -> Tensor:
        """Σ (or Σ of squares) over the local elements of each parameter tensor, for each of
        ``values`` (flat, fp32).

        Returns a (len(values), num_tensors) fp32 tensor of *partial* sums (this rank's
        pieces only); pass it (flattened, maybe with extra entries) to :meth:`complete`.
        A large piece is one ``sum``/``dot`` over a view (no full-size temporary); a run of small
        pieces is one ``index_add_`` in float64 over a copy of the run (small) — in float64 so
        that its sequential accumulation is as accurate as torch's pairwise fp32 sum.
        """
        device = values[0].device
        out = torch.zeros(len(values), self.num_tensors, dtype=torch.float32, device=device)
        if not self.is_whole:
            self._index_tensors(device)
        for row, v in zip(out, values):
            v = v.reshape(-1)
            if self.is_whole:
                row[0] = torch.dot(v, v) if squares else v.sum()
                continue
            if self._large:
                partial = [torch.dot(v[a:b], v[a:b]) if squares else v[a:b].sum() for _, a, b in self._large]
                row.index_add_(0, self._large_keys_t, torch.stack(partial).to(row.dtype))
            if self._runs:
                acc = torch.zeros(self.num_tensors, dtype=torch.float64, device=device)
                for run, keys in zip(self._runs, self._run_keys_t):
                    part = v[run.start : run.end].double()
                    acc.index_add_(0, keys, part.mul_(part) if squares else part)
                row.add_(acc.to(row.dtype))
        return out

    def scale_(self, x: Tensor, per_tensor: Tensor, divide: bool = False, src: Tensor | None = None) -> Tensor:
        """x = src · per_tensor (or src / per_tensor), each parameter tensor's elements by its own
        value of ``per_tensor``; ``src`` defaults to ``x`` (in place). Padding is left alone (with
        a separate ``src`` it keeps ``x``'s values). Returns flat ``x``."""
        x = x.view(-1)
        src = x if src is None else src.view(-1)
        op = torch.div if divide else torch.mul
        per_tensor = per_tensor.to(x.device, x.dtype)  # what an op with a 0-d operand does to it anyway
        if self.is_whole:
            return op(src, per_tensor.reshape(()), out=x)
        self._index_tensors(x.device)
        for key, a, b in self._large:
            op(src[a:b], per_tensor[key], out=x[a:b])
        for run, keys in zip(self._runs, self._run_keys_t):
            op(src[run.start : run.end], per_tensor.index_select(0, keys), out=x[run.start : run.end])
        return x

    def add_scaled_(self, x: Tensor, y: Tensor, per_tensor: Tensor, alpha: float = 1.0) -> Tensor:
        """x += alpha · per_tensor · y, each parameter tensor's elements by its own value of
        ``per_tensor``, in one pass (``addcmul_``; no temporary the size of a piece); padding is
        left alone. Returns flat ``x``."""
        x, y = x.view(-1), y.view(-1)
        per_tensor = per_tensor.to(x.device, x.dtype)
        if self.is_whole:
            return x.addcmul_(y, per_tensor.reshape(()), value=alpha)
        self._index_tensors(x.device)
        for key, a, b in self._large:
            x[a:b].addcmul_(y[a:b], per_tensor[key], value=alpha)
        for run, keys in zip(self._runs, self._run_keys_t):
            x[run.start : run.end].addcmul_(y[run.start : run.end], per_tensor.index_select(0, keys), value=alpha)
        return x

    def tensor_sums(self, values: Sequence[Tensor], squares: bool = False) -> Tensor:
        """:meth:`local_sums` completed across ranks: (len(values), num_tensors) fp32."""
        sums = self.local_sums(values, squares)
        if self.complete is not None:
            self.complete(sums)
        return sums

    def expand(self, per_tensor: Tensor) -> Tensor:
        """Broadcast one value per parameter tensor to every element (padding gets 0).

        For a whole tensor this is the scalar itself (broadcasting does the rest).
        """
        if self.is_whole:
            return per_tensor.reshape(())
        lengths, keys, valid = self._index_tensors(per_tensor.device)
        per_piece = torch.where(
            valid, per_tensor[keys], torch.zeros((), dtype=per_tensor.dtype, device=per_tensor.device)
        )
        return torch.repeat_interleave(per_piece, lengths, output_size=self.numel)

    def tensor_norms(self, values: Sequence[Tensor]) -> Tensor:
        """L2 norm of every parameter tensor, for each of ``values`` (one collective)."""
        return self.tensor_sums([v.float() for v in values], squares=True).sqrt_()

    def hold(self, absent: Tensor, param: Tensor, state: dict) -> "HeldElements":
        """Keep the elements of the parameter tensors marked ``absent`` (one bool per tensor) as
        they are through an update of flat ``param``: see :class:`HeldElements`."""
        return HeldElements(self, absent, param, state)


class HeldElements:
    """The elements of some parameter tensors of a flat shard, saved before an update and put
    back after it (:meth:`restore`), in the parameter and in every same-size state tensor.

    Under ZeRO a tensor that got no gradient this step sits in the same flat shard as tensors
    that did (DeepSpeed hands it a zero gradient). VRGD.md §1 skips it, as torch.optim skips a
    parameter whose ``.grad`` is None: its values and state stay as they were. State tensors
    created during the update (a first momentum buffer) start at zero there. Per-tensor state
    (``tensor_step``, one value per tensor) is not per-element and is left alone.
    """

    def __init__(self, layout: SegmentLayout, absent: Tensor, param: Tensor, state: dict):
        self.mask = layout.expand(absent.float()) > 0
        self.state = state
        self.numel = param.numel()
        tensors = [param] + [t for k, t in state.items() if self._per_element(k, t)]
        self.saved = [(t, t.view(-1)[self.mask].clone()) for t in tensors]
        self.known = {id(t) for t in tensors}

    def _per_element(self, key: str, t) -> bool:
        return key not in PER_TENSOR_STATE and torch.is_tensor(t) and t.numel() == self.numel

    def restore(self) -> None:
        for t, values in self.saved:
            t.view(-1)[self.mask] = values
        for k, t in self.state.items():
            if self._per_element(k, t) and id(t) not in self.known:
                t.view(-1)[self.mask] = 0
