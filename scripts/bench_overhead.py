"""Overhead of VRGD under DeepSpeed: time, memory and communication of VRLamb vs plain LAMB vs AdamW.

Every variant trains the same BERT-shaped masked-LM (transformers ``BertForMaskedLM`` built from a
``BertConfig``; no download) under DeepSpeed ZeRO-2 on 2 CPU ranks (gloo), in fp32 and bf16, with
gradient accumulation 1 and 4. One run measures everything:

    # the numbers in docs/results_overhead.md (30–45 min on 2 busy cores)
    python scripts/bench_overhead.py --profile --json runs/overhead.json --report runs/overhead.md
    # smoke run (tiny model, 2 rounds; tests/test_bench_overhead_smoke.py)
    python scripts/bench_overhead.py --quick

The script spawns its 2 ranks itself (vrgd_ds/multiproc.py's ``run_ranks``: spawned processes, file
rendezvous, OMP_NUM_THREADS=1, no JIT build of DeepSpeed's shm op).

Tensor parallelism (``--tensor-parallel T``): every encoder layer's linear layers become Megatron's
column-/row-parallel pairs over T consecutive ranks (query/key/value and the FFN's first layer split
by output features, the attention output and the FFN's second layer by input features, an
all-reduce after each row-parallel layer and of the gradient before each column-parallel one);
embeddings, LayerNorms, the row-parallel biases and the MLM head stay whole on every rank. The
mpu is ``vrgd_ds.megatron_mpu.MegatronStyleMpu(T)``; ZeRO's group is its data-parallel group. The
tensor-parallel issue-12 numbers (fp32, ZeRO-2, TP2 × DP1 on 2 CPU ranks, gas 4):

    python scripts/bench_overhead.py --tensor-parallel 2 --precisions fp32 --accumulations 4 \
        --json docs/results_overhead_tp2_gas4.json

On GPUs (scripts/gpu_check.sh; one GPU per rank, NCCL, native bf16 matrix products):

    # BERT-large, bf16, gas 16, ZeRO-2, micro-batch 32, on one GPU (k = 16 samples per step)
    python scripts/bench_overhead.py --device cuda --size large --json runs/gpu.json --report runs/gpu.md

There every clock is read after ``torch.cuda.synchronize()``, and the memory table is the GPU
memory allocated by torch (``memory_allocated`` / ``max_memory_allocated``) instead of the
process's resident memory; TCP bytes are not measured, and with one rank nothing is sent (the
bytes columns are 0, extra / limit NaN).

Variants (DeepSpeed ``"optimizer"`` sections; lr 1e-3, weight decay 0.01 on ≥2-D tensors, 0 on
biases and LayerNorm weights, ``gradient_clipping`` 1.0):
  * ``VRLamb per_step`` / ``VRLamb per_micro_step``: ``{"type": "VRLamb"}`` with
    ``moment_reduction`` forced; "auto" picks per_step when gradient_accumulation_steps > 1,
    per_micro_step otherwise (marked ``*`` in the tables);
  * ``LAMB``: the same with ``"vr": false`` (our LAMB, the baseline of the ratios);
  * ``AdamW``: ``{"type": "AdamW", "params": {"torch_adam": true}}`` (torch.optim.AdamW; avoids
    the FusedAdam JIT build).

Protocol
  * Variants of one (precision, accumulation) block are built one after the other, each kept
    alive as its own engine, warmed up, then timed round-robin for ``rounds`` rounds (the start
    of the order rotates each round): the machine is shared and noisy, so paired variants see
    the same load. Blocks run one after the other (all 16 engines of BERT size at once would
    need ~24 GB). Ratios are of medians within a block.
  * A training step is ``gas`` micro-batches of forward, ``engine.backward``, ``engine.step()``.
    ``opt step`` is the ``engine.step()`` call at the accumulation boundary (ZeRO's overflow
    check, gradient norm, VR's moment reduce-scatter and GSNR, the optimizer update, the
    parameter all-gather); ``fwd+bwd`` is the rest (ZeRO-2 reduces gradients during backward,
    and per_micro_step reduces g² there too). Before every timed step the ranks meet in a
    barrier; each number is the slower rank's.
  * bf16: this CPU (AVX2, no AVX512-BF16/AMX) runs bf16 matrix products ~40x slower than fp32
    (a reference kernel). By default (``--bf16-matmul fp32``) bf16 ``mm/addmm/bmm/baddbmm`` of
    the forward and backward are computed in fp32 and rounded back to bf16 (a TorchDispatchMode),
    so the forward/backward costs about what a bf16-capable device's would, relatively. Everything
    DeepSpeed and vrgd_ds do (bf16 parameters and gradients, bf16 reductions, fp32 master
    partitions, the VR hooks) is unchanged; the mode is not active during ``engine.step()``.
  * Memory per rank, from /proc/self/status: ``peak`` = VmHWM − VmRSS before the engine was
    built, over building it and its warm-up steps (VmHWM reset through /proc/self/clear_refs);
    ``held`` = VmRSS after warm-up − VmRSS before build (the engine's resident memory);
    ``step transient`` = median over timed steps of VmHWM during the step − VmRSS at its start
    (temporaries). ``VR buffers`` are exact tensor sizes: ``extra_buffer_bytes()`` of the
    engine's moment source plus the GSNR momentum state (``gsnr_momentum``, one fp32 value per
    partition element).
  * Communication: torch.distributed's collectives are wrapped in every rank before DeepSpeed's
    comm backend is created, and one step after warm-up is counted (steps are identical). For
    each call the payload is the tensor size (input of reduce-scatter, output of all-gather);
    ``bytes/rank`` is what a ring algorithm sends per rank, on average over ranks:
    payload·2(w−1)/w for all-reduce, payload·(w−1)/w for reduce-scatter, all-gather, reduce,
    broadcast (w = group size); a point-to-point send (``isend``/``send``) counts its payload.
    VR's extra bytes = the VR variant's minus LAMB's; the limit is
    one extra fp32 reduce-scatter of all N parameters per step and per moment VR reduces:
    4·N·(w−1)/w for Σg², twice that in bf16/fp16, where Σg is reduced beside it (DeepSpeed's own
    16-bit G is too rounded for r; vrgd_ds/deepspeed_glue/source.py). ``TCP sent`` is
    what gloo really sent in that step (acknowledged bytes of the rank's TCP sockets, from
    ``ss -tinp``; mean of the ranks): gloo implements some collectives differently from the
    ring model (reduce-scatter as an all-reduce of a full copy, for one).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # benchlib (also when imported by a test)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import benchlib  # noqa: E402

WORLD_SIZE = 2
LAMB_PARAMS = {"lr": 1e-3, "weight_decay": 0.01}
TARGETS = {"full_step_ratio_gas4": 1.10, "opt_step_ratio": 1.5, "extra_bytes_ratio": 1.05}


# ---- what is measured ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    optimizer: dict  # the DeepSpeed config's "optimizer" section
    strategy: str | None = None  # VR moment reduction, None for the baselines

    def is_auto(self, gas: int, stage: int = 2) -> bool:
        """Whether moment_reduction "auto" picks this variant's strategy (ZeRO-3: per_micro_step)."""
        return self.strategy == ("per_step" if gas > 1 and stage < 3 else "per_micro_step")


VARIANTS = (
    Variant(
        "VRLamb per_step", {"type": "VRLamb", "params": {**LAMB_PARAMS, "moment_reduction": "per_step"}}, "per_step"
    ),
    Variant(
        "VRLamb per_micro_step",
        {"type": "VRLamb", "params": {**LAMB_PARAMS, "moment_reduction": "per_micro_step"}},
        "per_micro_step",
    ),
    Variant("LAMB", {"type": "VRLamb", "params": {**LAMB_PARAMS, "vr": False}}),
    Variant("AdamW", {"type": "AdamW", "params": {**LAMB_PARAMS, "torch_adam": True}}),
)
# --stats-cost: VR-LAMB per_step without the gradient-noise statistics too, to measure what the
# statistics cost (ratio of the two VR rows). Read from the environment so that the spawned ranks,
# which import this module afresh, build the same list.
STATS_COST_ENV = "VRGD_BENCH_STATS_COST"
STATS_OFF = Variant(
    "VRLamb per_step no stats",
    {"type": "VRLamb", "params": {**LAMB_PARAMS, "moment_reduction": "per_step", "gradient_stats": False}},
    None,  # not what "auto" picks
)


# --anchors (GPUs): what large-batch users compare VR-LAMB with — DeepSpeed's own fused LAMB kernel
# ("type": "Lamb", FusedLamb; needs its CUDA op) and torch's fused AdamW — at the same size. Read
# from the environment for the same reason as --stats-cost.
ANCHORS_ENV = "VRGD_BENCH_ANCHORS"
ANCHORS = (
    Variant("FusedLamb", {"type": "Lamb", "params": dict(LAMB_PARAMS)}),
    Variant("AdamW fused", {"type": "AdamW", "params": {**LAMB_PARAMS, "torch_adam": True, "fused": True}}),
)


def variants() -> tuple[Variant, ...]:
    """The variants measured: VARIANTS, plus STATS_OFF with --stats-cost and ANCHORS with --anchors."""
    out = VARIANTS[:1] + (STATS_OFF,) + VARIANTS[1:] if os.environ.get(STATS_COST_ENV) == "1" else VARIANTS
    return out + ANCHORS if os.environ.get(ANCHORS_ENV) == "1" else out


BASELINE = "LAMB"


@dataclass(frozen=True)
class BenchConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq: int
    micro_batch: int
    rounds: int
    warmup: int
    precisions: tuple = ("fp32", "bf16")
    accumulations: tuple = (1, 4)
    world: int = 2  # ranks (processes); on CUDA one GPU each
    device: str = "cpu"  # "cpu": gloo, timings and memory of the processes; "cuda": NCCL, GPU memory
    stage: int = 2  # ZeRO stage (1, 2 or 3)
    # bf16 + ZeRO-1 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer (Megatron-DeepSpeed's path)
    bf16_optimizer: bool = False
    # Megatron-style tensor parallelism: shards per encoder linear layer (consecutive ranks), through
    # a vrgd_ds.megatron_mpu.MegatronStyleMpu; world // tensor_parallel data-parallel replicas
    tensor_parallel: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks (ZeRO's group; k = dp × gradient accumulation steps)."""
        return self.world // self.tensor_parallel

    def bert_config(self):
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=max(512, self.seq),
        )


FULL = BenchConfig(
    hidden=768, layers=4, heads=12, intermediate=3072, vocab=30522, seq=128, micro_batch=2, rounds=6, warmup=1
)
QUICK = BenchConfig(
    hidden=64, layers=2, heads=4, intermediate=128, vocab=512, seq=32, micro_batch=2, rounds=2, warmup=0
)
# BERT-large (335M parameters), phase-1 sequence length; for GPUs (scripts/gpu_check.sh).
LARGE = BenchConfig(
    hidden=1024,
    layers=24,
    heads=16,
    intermediate=4096,
    vocab=30522,
    seq=128,
    micro_batch=32,
    rounds=5,
    warmup=1,
    precisions=("bf16",),
    accumulations=(16,),
)
SIZES = {"full": FULL, "quick": QUICK, "large": LARGE}
DEVICE = "cpu"  # set in each rank from its BenchConfig


def _sync() -> None:
    """Wait for the GPU's queued work before a clock is read (no-op on CPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---- collective accounting ---------------------------------------------------------------------
# name -> (argument holding the payload, ring factor in units of (w-1)/w)
_COLLECTIVES = {
    "all_reduce": ("tensor", 2),
    "all_reduce_coalesced": ("tensors", 2),
    "reduce": ("tensor", 1),
    "broadcast": ("tensor", 1),
    "reduce_scatter_tensor": ("input", 1),
    "_reduce_scatter_base": ("input", 1),
    "reduce_scatter_single": ("input", 1),
    "reduce_scatter": ("input_list", 1),
    "all_gather_into_tensor": ("output_tensor", 1),
    "_all_gather_base": ("output_tensor", 1),
    "all_gather_single": ("output_tensor", 1),
    "all_gather": ("tensor_list", 1),
    "all_to_all_single": ("input", 1),
    # point-to-point (vrgd_ds's reduce-scatter on gloo): the sender sends exactly the payload
    "send": ("tensor", None),
    "isend": ("tensor", None),
}


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


# ---- whose code is it: vrgd_ds, DeepSpeed or neither --------------------------------------------
# Decided by module name (collective counter) or by the file's place in the imported package's
# own directory (profiler frames, which carry only a file name) -- never by a substring of the
# path: a checkout in a folder named vrgd_ds (or deepspeed) puts that name in every installed
# package's path (tests/test_bench_overhead_smoke.py once failed that way).
LIBRARIES = ("vrgd_ds", "deepspeed")


def package_of_module(module_name) -> str | None:
    """``"vrgd_ds"`` / ``"deepspeed"`` when ``module_name`` is that package or one of its
    submodules, else None."""
    if not isinstance(module_name, str):
        return None
    root = module_name.partition(".")[0]
    return root if root in LIBRARIES else None


@functools.lru_cache(maxsize=None)
def _library_dirs() -> tuple[tuple[str, str], ...]:
    """(package, real path of its directory + os.sep) of each imported library package."""
    out = []
    for name in LIBRARIES:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        for directory in getattr(module, "__path__", ()):
            out.append((name, os.path.join(os.path.realpath(directory), "")))
    # Longest first: a package nested in another's directory is matched by the inner one.
    return tuple(sorted(out, key=lambda item: -len(item[1])))


@functools.lru_cache(maxsize=4096)
def package_of_file(filename: str) -> tuple[str, str] | None:
    """(package, path relative to the package's parent, "/"-separated) when ``filename`` lies in
    the directory of the imported ``vrgd_ds`` or ``deepspeed`` package, else None."""
    real = os.path.realpath(filename)
    for name, directory in _library_dirs():
        if real.startswith(directory):
            return name, name + "/" + real[len(directory) :].replace(os.sep, "/")
    return None


class CollectiveCounter:
    """Wraps torch.distributed's collectives; counts payload and ring bytes per rank while enabled.

    Installed before DeepSpeed creates its comm backend (which keeps references to
    ``all_gather_into_tensor`` / ``reduce_scatter_tensor``). A call is attributed to the innermost
    frame on the stack whose module belongs to vrgd_ds (``vrgd_ds.<file>.<function>``) or to
    DeepSpeed (``deepspeed``), else to ``other``.
    """

    def __init__(self):
        self.enabled = False
        self.records: dict[tuple[str, str], list[float]] = {}
        self._local = threading.local()

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, (arg, factor) in _COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is None or getattr(original, "_bench_counted", False):
                continue
            wrapped = self._wrap(name, original, arg, factor)
            setattr(dist, name, wrapped)
            if getattr(c10d, name, None) is original:
                setattr(c10d, name, wrapped)

    def _wrap(self, name, original, arg, factor):
        signature = inspect.signature(original)
        counter = self

        def wrapper(*args, **kwargs):
            if not counter.enabled or getattr(counter._local, "inside", False):
                return original(*args, **kwargs)
            counter._local.inside = True
            try:
                bound = signature.bind(*args, **kwargs)
                payload = _nbytes(bound.arguments.get(arg))
                import torch.distributed as dist

                world = dist.get_world_size(group=bound.arguments.get("group"))
                ring = payload if factor is None else payload * factor * (world - 1) / world
                key = (name, counter._origin())
                entry = counter.records.setdefault(key, [0, 0, 0])
                entry[0] += 1
                entry[1] += payload
                entry[2] += ring
                return original(*args, **kwargs)
            finally:
                counter._local.inside = False

        wrapper._bench_counted = True
        wrapper.__wrapped__ = original
        return wrapper

    def _origin(self) -> str:
        # The innermost library frame decides: vrgd_ds wraps DeepSpeed's step(), so an outer
        # vrgd_ds frame does not make DeepSpeed's own all-gather a VR collective.
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_globals.get("__name__") == "vrgd_ds.megatron_mpu":
                return TP_ORIGIN  # the model's tensor-parallel all-reduces, not VR's
            package = package_of_module(frame.f_globals.get("__name__"))
            if package == "vrgd_ds":
                return f"vrgd_ds.{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}"
            if package == "deepspeed":
                return "deepspeed"
            frame = frame.f_back
        return "other"

    def take(self) -> list[dict]:
        out = [
            {"op": op, "origin": origin, "calls": int(c), "payload": p, "ring": r}
            for (op, origin), (c, p, r) in sorted(self.records.items())
        ]
        self.records = {}
        return out


COUNTER = CollectiveCounter()


def tcp_bytes_sent() -> int | None:
    """Bytes this process's TCP sockets have sent and had acknowledged (``ss -tinpH``,
    iproute2), i.e. what gloo really put on the wire; None where ``ss`` is unavailable."""
    import re
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        return None
    lines = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=False).stdout.splitlines()
    total, mine, tag = 0, False, f"pid={os.getpid()},"
    for line in lines:
        if not line[:1].isspace():  # a socket line; its details follow on the next line
            mine = tag in line
        elif mine:
            match = re.search(r"bytes_acked:(\d+)", line)
            total += int(match.group(1)) if match else 0
    return total


# ---- memory -------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    kib = _status_kib("VmHWM")
    return rss_bytes() if kib is None else kib * 1024


# What the memory table measures: the process's resident memory on CPU, the GPU's allocated
# memory (torch's caching allocator: memory_allocated / max_memory_allocated) on CUDA.
def mem_now() -> int:
    if DEVICE == "cuda":
        _sync()
        return torch.cuda.memory_allocated()
    return rss_bytes()


def mem_reset_peak() -> bool:
    if DEVICE == "cuda":
        _sync()
        torch.cuda.reset_peak_memory_stats()
        return True
    return reset_peak()


def mem_peak() -> int:
    if DEVICE == "cuda":
        _sync()
        return torch.cuda.max_memory_allocated()
    return peak_bytes()


# ---- bf16 matrix products in fp32 ---------------------------------------------------------------
def _bf16_matmul_in_fp32_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    class Bf16MatmulInFp32(TorchDispatchMode):
        """bf16 mm/addmm/bmm/baddbmm computed in fp32, result rounded to bf16 (see module docstring)."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in ops and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
                return func(*up, **kwargs).to(torch.bfloat16)
            return func(*args, **kwargs)

    return Bf16MatmulInFp32


# ---- tensor parallelism (Megatron-style, hand-written) --------------------------------------------
TP_ORIGIN = "model (tensor parallel)"  # the collective counter's origin of the model's own all-reduces


def _copy_to_tensor_parallel_region(x, group):
    from vrgd_ds.megatron_mpu import copy_to_tensor_parallel_region

    return copy_to_tensor_parallel_region(x, group)


def _mark_sharded(p: torch.Tensor, dim: int) -> None:
    p.tensor_model_parallel = True  # what Megatron's layers set (DeepSpeed's is_model_parallel_parameter)
    p.partition_dim = dim
    p.partition_stride = 1


class ColumnParallelLinear(torch.nn.Module):
    """This rank's rows (output features) of ``linear``; ``copy_input``: all-reduce the input's
    gradient here (False where the caller does it once for several layers, as for query/key/value)."""

    def __init__(self, linear: torch.nn.Linear, tp: int, tp_rank: int, group, copy_input: bool = True):
        super().__init__()
        rows = slice(tp_rank * linear.out_features // tp, (tp_rank + 1) * linear.out_features // tp)
        self.weight = torch.nn.Parameter(linear.weight.detach()[rows].clone())
        self.bias = torch.nn.Parameter(linear.bias.detach()[rows].clone())
        _mark_sharded(self.weight, 0)
        _mark_sharded(self.bias, 0)
        self.group, self.copy_input = group, copy_input

    def forward(self, x):
        if self.copy_input:
            x = _copy_to_tensor_parallel_region(x, self.group)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(torch.nn.Module):
    """This rank's columns (input features) of ``linear``; the partial outputs summed over the
    tensor-parallel group, then the whole bias added (replicated, as in Megatron)."""

    def __init__(self, linear: torch.nn.Linear, tp: int, tp_rank: int, group):
        super().__init__()
        cols = slice(tp_rank * linear.in_features // tp, (tp_rank + 1) * linear.in_features // tp)
        self.weight = torch.nn.Parameter(linear.weight.detach()[:, cols].clone())
        self.bias = torch.nn.Parameter(linear.bias.detach().clone())
        _mark_sharded(self.weight, 1)
        self.group = group

    def forward(self, x):
        from vrgd_ds.megatron_mpu import reduce_from_tensor_parallel_region

        return reduce_from_tensor_parallel_region(torch.nn.functional.linear(x, self.weight), self.group) + self.bias


def _copy_hidden_states_hook(group):
    """Forward pre-hook of a BertSelfAttention: its input, shared by query, key and value, gets
    one gradient all-reduce (Megatron's fused QKV layer has one)."""

    def hook(module, args, kwargs):
        if args:
            return (_copy_to_tensor_parallel_region(args[0], group), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _copy_to_tensor_parallel_region(kwargs["hidden_states"], group)}

    return hook


def shard_for_tensor_parallel(model, tp: int, tp_rank: int, group):
    """Megatron's tensor parallelism of a BertForMaskedLM's encoder, in place: per layer, query/key/
    value and the FFN's first layer column-parallel (heads and FFN units split over the ranks),
    the attention output and the FFN's second layer row-parallel. Parameter names are unchanged;
    every rank must hold the same whole model before (same seed)."""
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(attention, name, ColumnParallelLinear(getattr(attention, name), tp, tp_rank, group, False))
        attention.num_attention_heads //= tp
        attention.all_head_size //= tp
        attention.register_forward_pre_hook(_copy_hidden_states_hook(group), with_kwargs=True)
        layer.attention.output.dense = RowParallelLinear(layer.attention.output.dense, tp, tp_rank, group)
        layer.intermediate.dense = ColumnParallelLinear(layer.intermediate.dense, tp, tp_rank, group)
        layer.output.dense = RowParallelLinear(layer.output.dense, tp, tp_rank, group)
    return model


def build_model(cfg: BenchConfig, mpu=None):
    """The benchmark's BertForMaskedLM (seed 0, the same on every rank), sharded over ``mpu``'s
    tensor-parallel group when given."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(cfg.bert_config())
    if mpu is not None:
        shard_for_tensor_parallel(model, mpu.tp, mpu.tp_rank, mpu.tp_group)
    return model


def whole_numel(p: torch.Tensor, tp: int) -> int:
    return p.numel() * tp if getattr(p, "tensor_model_parallel", False) else p.numel()


def check_tensor_parallel(cfg: BenchConfig, mpu, batch: dict) -> dict:
    """The sharded model against the whole one (eval mode, fp32, one micro-batch): the loss, and
    every parameter's gradient against the matching slice of the whole model's (the replicated
    ones need the gradient all-reduces); the largest relative error over parameters."""
    whole, sharded = build_model(cfg).to(DEVICE).eval(), build_model(cfg, mpu).to(DEVICE).eval()
    losses = []
    for model in (whole, sharded):
        loss = model(**{k: v.to(DEVICE) for k, v in batch.items()}).loss
        loss.backward()
        losses.append(loss.item())
    whole_params = dict(whole.named_parameters())
    pairs = []
    for name, p in sharded.named_parameters():
        reference = whole_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            reference = reference.chunk(mpu.tp, dim=p.partition_dim)[mpu.tp_rank]
        pairs.append((p.grad, reference))
    # A key bias's gradient is 0 but for rounding (softmax ignores a shift of all scores): errors
    # relative to at least 1e-3 of the largest gradient norm.
    floor = 1e-3 * max(reference.norm().item() for _, reference in pairs)
    grad_err = max((grad - reference).norm().item() / max(reference.norm().item(), floor) for grad, reference in pairs)
    return {"loss_whole": losses[0], "loss_sharded": losses[1], "grad_max_rel_err": grad_err}


# ---- one rank -----------------------------------------------------------------------------------
def ds_config(variant: Variant, precision: str, gas: int, cfg: BenchConfig, dp: int) -> dict:
    out = {
        "train_batch_size": cfg.micro_batch * gas * dp,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": gas,
        "optimizer": json.loads(json.dumps(variant.optimizer)),
        "zero_optimization": {"stage": cfg.stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    if cfg.bf16_optimizer:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def make_batches(cfg: BenchConfig, rank: int, count: int, device="cpu") -> list[dict]:
    """MLM micro-batches: random tokens, 15% of positions carry a label (the rest -100)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(count):
        ids = torch.randint(0, cfg.vocab, (cfg.micro_batch, cfg.seq), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]  # at least one label per sequence
        out.append(
            {
                k: v.to(device)
                for k, v in {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}.items()
            }
        )
    return out


def build_engine(variant: Variant, precision: str, gas: int, cfg: BenchConfig, dp: int, mpu=None):
    """``dp``: data-parallel ranks; ``mpu``: a MegatronStyleMpu for tensor parallelism, else None."""
    import deepspeed

    import vrgd_ds  # noqa: F401  (registers "VRLamb")

    model = build_model(cfg, mpu)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config(variant, precision, gas, cfg, dp), mpu=mpu
    )
    return engine


TIMES = ("total", "fwd_bwd", "opt")  # wall-clock seconds; "cpu_" + name: CPU seconds of the process


def train_step(engine, batches, matmul_mode, around_opt_step=nullcontext) -> dict[str, float]:
    """One optimizer step (len(batches) micro-batches): wall-clock and CPU seconds (all threads of
    this process: compute, gloo's copies, page faults; not time spent waiting) of the whole step,
    of forward+backward, and of the boundary ``engine.step()`` ("opt").

    ``around_opt_step()`` is entered around the boundary ``engine.step()`` (the profiler).
    """
    out = dict.fromkeys(TIMES + tuple("cpu_" + t for t in TIMES), 0.0)
    _sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with matmul_mode() if matmul_mode is not None else nullcontext():
            loss = engine(**batch).loss
            engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            _sync()
            t1, c1 = time.perf_counter(), time.process_time()
            with around_opt_step():
                engine.step()
            _sync()
            t2, c2 = time.perf_counter(), time.process_time()
            out["fwd_bwd"] += t1 - t0
            out["cpu_fwd_bwd"] += c1 - c0
            out["opt"] += t2 - t1
            out["cpu_opt"] += c2 - c1
        else:
            engine.step()
            _sync()
            out["fwd_bwd"] += time.perf_counter() - t0
            out["cpu_fwd_bwd"] += time.process_time() - c0
    _sync()
    out["total"] = time.perf_counter() - start
    out["cpu_total"] = time.process_time() - cpu_start
    return out


_PY_FRAME = re.compile(r"^(.*\.py)\((\d+)\): (.*)$")


@functools.lru_cache(maxsize=1)
def _profiler_prefixes() -> tuple[str, ...]:
    """The directory prefixes torch's profiler strips from the file names of Python frames
    (torch/profiler/python_tracer.py: site-packages, sys.path, ...; the first that matches, in
    reverse sorted order)."""
    import site

    raw = list(sys.path) + [os.path.dirname(os.path.dirname(torch.__file__))]
    for extra in (site.getsitepackages, site.getuserbase, site.getusersitepackages):
        try:
            value = extra()
        except Exception:  # noqa: BLE001 - some virtualenvs lack parts of site
            continue
        raw += value if isinstance(value, list) else [value]
    return tuple(
        os.path.join(os.path.abspath(p), "")
        for p in sorted({os.path.abspath(p) for p in raw if isinstance(p, str)}, reverse=True)
    )


@functools.lru_cache(maxsize=4096)
def _profiler_file(shown: str) -> str | None:
    """Real path of the file a profiler frame names (``deepspeed/runtime/engine.py``, relative to
    the prefix the profiler stripped, or absolute); None when no such file is found."""
    if os.path.isabs(shown):
        return os.path.realpath(shown)
    for prefix in _profiler_prefixes():
        if os.path.exists(prefix + shown):
            return os.path.realpath(prefix + shown)
    return None


@functools.lru_cache(maxsize=4096)
def is_profiler_frame(event_name: str) -> bool:
    """A Python frame of torch's profiler itself (torch/profiler/, torch/autograd/profiler*.py)."""
    match = _PY_FRAME.match(event_name)
    if not match:
        return False
    import torch.autograd
    import torch.profiler

    real = _profiler_file(match.group(1))
    if real is None:
        return False
    autograd_dir = os.path.realpath(os.path.dirname(torch.autograd.__file__))
    return real.startswith(os.path.join(os.path.realpath(os.path.dirname(torch.profiler.__file__)), "")) or (
        os.path.dirname(real) == autograd_dir and os.path.basename(real).startswith("profiler")
    )


def frame_owner(event_name: str) -> str | None:
    """``"vrgd_ds/optimizer.py(123): step"`` (or ``deepspeed/...``) for a profiler Python frame
    ``"<path>.py(123): step"`` of vrgd_ds or DeepSpeed, else None."""
    match = _PY_FRAME.match(event_name)
    if not match:
        return None
    real = _profiler_file(match.group(1))
    found = None if real is None else package_of_file(real)
    return None if found is None else f"{found[1]}({match.group(2)}): {match.group(3)}"


def attribute_profile(prof, top: int = 40) -> dict:
    """Self time (elapsed, torch.profiler) of a profiled optimizer step, by (function, op).

    Every operator (aten::, c10d::, ...) and every Python frame's own time goes to the innermost
    Python frame of vrgd_ds or DeepSpeed around it (itself, for a Python frame of theirs), else
    to "other: <innermost Python frame>"; a Python frame's own time is listed as op "(python)".
    The profiler's own frames are left out. Times in seconds.
    """
    by_key: dict[tuple[str, str], list[float]] = {}
    by_function: dict[str, float] = {}
    total = 0.0
    events = prof.events()
    # Only the training thread (DeepSpeed's step runs there; gloo waits are its own ops).
    main_thread = next((e.thread for e in events if (frame_owner(e.name) or "").startswith("deepspeed/")), None)
    for event in events:
        if event.thread != main_thread:
            continue
        match = _PY_FRAME.match(event.name)
        builtin = event.name.startswith("<built-in")
        owner, first_frame, node = None, None, event
        while node is not None:
            name = node.name
            if is_profiler_frame(name):
                owner = "skip"
                break
            if _PY_FRAME.match(name):
                first_frame = first_frame or name
                owner = frame_owner(name)
                if owner is not None:
                    break
            node = node.cpu_parent
        if owner == "skip":
            continue
        owner = owner or f"other: {first_frame}"
        seconds = event.self_cpu_time_total / 1e6
        op = "(python)" if match else (" ".join(event.name.split()[:3]) + ">" if builtin else event.name)
        acc = by_key.setdefault((owner, op), [0.0, 0])
        acc[0] += seconds
        acc[1] += 1
        by_function[owner] = by_function.get(owner, 0.0) + seconds
        total += seconds
    rows = sorted(((o, op, t, n) for (o, op), (t, n) in by_key.items()), key=lambda r: -r[2])[:top]
    functions = sorted(by_function.items(), key=lambda kv: -kv[1])[:top]
    return {"total": total, "rows": rows, "functions": functions}


def profiled_step(engine, batches, mode) -> dict:
    from torch.profiler import ProfilerActivity, profile

    holder = {}

    def around():
        holder["prof"] = profile(activities=[ProfilerActivity.CPU], with_stack=True)
        return holder["prof"]

    times = train_step(engine, batches, mode, around)
    out = attribute_profile(holder["prof"])
    out["opt_step_s"] = times["opt"]
    return out


def moment_source(engine):
    """The engine's VR optimizer's moment source (None for optimizers that collect no moments)."""
    import vrgd_ds

    opt = vrgd_ds.find_vr_optimizer(engine)
    return None if opt is None else opt.moment_source


def vr_buffer_bytes(engine) -> dict[str, int]:
    import vrgd_ds

    source = moment_source(engine)
    if source is None:
        return {}
    out = dict(source.extra_buffer_bytes())
    opt = vrgd_ds.find_vr_optimizer(engine)
    momentum = sum(
        s["gsnr_momentum"].numel() * s["gsnr_momentum"].element_size()
        for s in opt.state.values()
        if "gsnr_momentum" in s
    )
    if momentum:
        out["gsnr_momentum state (fp32, partition)"] = momentum
    return out


def build_and_measure(variant: Variant, precision: str, gas: int, cfg: BenchConfig, mpu, batches, mode):
    """Build a variant's engine, warm it up, count one step's collectives; memory around all of it."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    rss0 = mem_now()
    mem_reset_peak()
    engine = build_engine(variant, precision, gas, cfg, cfg.dp, mpu)
    for _ in range(cfg.warmup):
        train_step(engine, batches, mode)
    dist.barrier()
    tcp0 = tcp_bytes_sent() if DEVICE == "cpu" else None
    COUNTER.enabled = True
    train_step(engine, batches, mode)
    COUNTER.enabled = False
    dist.barrier()
    time.sleep(0.2)  # let the last acknowledgements arrive
    tcp1 = tcp_bytes_sent() if tcp0 is not None else None
    collectives = COUNTER.take()
    gc.collect()
    entry = {
        "peak_bytes": mem_peak() - rss0,
        "held_bytes": mem_now() - rss0,
        "collectives": collectives,
        "tcp_bytes": None if tcp0 is None else tcp1 - tcp0,
        "vr_buffers": vr_buffer_bytes(engine),
        # ZeRO-3 leaves an empty tensor in p; ds_numel is the parameter's full size. With tensor
        # parallelism: this rank's shards and the replicated tensors (num_params_whole: the model's).
        "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "num_params_whole": sum(whole_numel(p, cfg.tensor_parallel) for p in engine.module.parameters()),
        "num_tensors": len(list(engine.module.parameters())),
        "actual_strategy": moment_source(engine).strategy if variant.strategy else None,
        # Moments VR reduces per element: Σg², and Σg where DeepSpeed's gradient is 16-bit.
        "moments": (2 if moment_source(engine).tracks_first else 1) if variant.strategy else 0,
        "wrapper": type(engine.optimizer).__name__,  # DeepSpeed's optimizer wrapper (e.g. BF16_Optimizer)
        **{key: [] for key in TIMES + tuple("cpu_" + t for t in TIMES)},
        "transient_bytes": [],
    }
    return engine, entry


def timed_step(engine, entry: dict, batches, mode) -> None:
    """One timed step after a barrier; appends its times and transient memory to ``entry``."""
    import torch.distributed as dist

    dist.barrier()
    before = mem_now()
    mem_reset_peak()
    times = train_step(engine, batches, mode)
    entry["transient_bytes"].append(mem_peak() - before)
    for key, value in times.items():
        entry[key].append(value)


def rank_body(rank: int, world: int, cfg_dict: dict, bf16_matmul: str, profile: bool = False) -> dict:
    """One rank of the benchmark: every (precision, accumulation) block in turn (module docstring)."""
    import torch.distributed as dist

    global DEVICE
    COUNTER.install()  # before deepspeed.initialize creates DeepSpeed's comm backend
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    cfg = BenchConfig(**cfg_dict)
    DEVICE = cfg.device  # on CUDA run_ranks(backend="nccl") made GPU `rank` this rank's device
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    t_start = time.perf_counter()

    def say(text):
        if rank == 0:
            print(f"[{time.perf_counter() - t_start:6.0f} s] {text}", flush=True)

    fp32_mode = _bf16_matmul_in_fp32_mode() if bf16_matmul == "fp32" and DEVICE == "cpu" else None
    mpu = None
    if cfg.tensor_parallel > 1:
        from vrgd_ds.megatron_mpu import MegatronStyleMpu

        mpu = MegatronStyleMpu(cfg.tensor_parallel)
    data_rank = rank if mpu is None else mpu.dp_rank  # a tensor-parallel group reads one batch
    batches = make_batches(cfg, data_rank, max(cfg.accumulations), DEVICE)
    # Imports and first-call allocations must not count as the first variant's memory.
    quick = dataclasses.replace(QUICK, world=cfg.world, tensor_parallel=cfg.tensor_parallel)
    warm_gas = 1 if cfg.dp > 1 else 2  # k >= 2
    warm = build_engine(VARIANTS[2], "fp32", warm_gas, quick, cfg.dp, mpu)
    train_step(warm, make_batches(quick, data_rank, warm_gas, DEVICE), None)
    warm.destroy()
    del warm
    say("imports and a throw-away engine done")
    results = {"blocks": [], "peak_resettable": mem_reset_peak()}
    if mpu is not None:
        results["tp_check"] = check_tensor_parallel(cfg, mpu, make_batches(cfg, data_rank, 1)[0])
        say(f"tensor-parallel model against the whole one: {results['tp_check']}")
        gc.collect()

    for precision in cfg.precisions:
        mode = fp32_mode if precision == "bf16" else None
        for gas in cfg.accumulations:
            block = {"precision": precision, "gas": gas, "variants": {}}
            engines = {}
            for variant in variants():
                t = time.perf_counter()
                engines[variant.name], entry = build_and_measure(variant, precision, gas, cfg, mpu, batches[:gas], mode)
                block["variants"][variant.name] = entry
                say(
                    f"[{precision} gas={gas}] {variant.name}: built, {cfg.warmup} warm-up + 1 counted step in "
                    f"{time.perf_counter() - t:.1f} s; held {entry['held_bytes'] / 2**20:.0f} MiB, "
                    f"RSS {rss_bytes() / 2**20:.0f} MiB"
                    + (f", GPU allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB" if DEVICE == "cuda" else "")
                )
            for r in range(cfg.rounds):
                for variant in variants()[r % len(variants()) :] + variants()[: r % len(variants())]:
                    timed_step(engines[variant.name], block["variants"][variant.name], batches[:gas], mode)
                say(
                    f"[{precision} gas={gas}] round {r + 1}/{cfg.rounds}: "
                    + ", ".join(f"{v.name} {block['variants'][v.name]['total'][-1]:.2f} s" for v in variants())
                )
            if profile:
                for variant in variants():
                    dist.barrier()
                    if rank == 0:
                        block["variants"][variant.name]["profile"] = profiled_step(
                            engines[variant.name], batches[:gas], mode
                        )
                    else:
                        train_step(engines[variant.name], batches[:gas], mode)
            results["blocks"].append(block)
            for engine in engines.values():
                engine.destroy()
            del engines, engine
            gc.collect()
    results["max_rss_bytes"] = _max_rss()
    return results


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- report -------------------------------------------------------------------------------------
def merge_ranks(per_rank: list[dict]) -> list[dict]:
    """Per step the slower rank's wall time and the ranks' mean CPU time; per memory figure the
    larger rank's; bytes per rank averaged over ranks."""
    blocks = []
    for bi, block in enumerate(per_rank[0]["blocks"]):
        merged = {"precision": block["precision"], "gas": block["gas"], "variants": {}}
        for name, entry in block["variants"].items():
            entries = [r["blocks"][bi]["variants"][name] for r in per_rank]
            m = {k: [max(vals) for vals in zip(*(e[k] for e in entries))] for k in TIMES + ("transient_bytes",)}
            m.update(
                {
                    k: [statistics.fmean(vals) for vals in zip(*(e[k] for e in entries))]
                    for k in ("cpu_" + t for t in TIMES)
                }
            )
            for k in ("peak_bytes", "held_bytes"):
                m[k] = max(e[k] for e in entries)
            tcp = [e["tcp_bytes"] for e in entries]
            m["tcp_bytes"] = None if None in tcp else statistics.fmean(tcp)
            m["vr_buffers"] = {k: max(e["vr_buffers"].get(k, 0) for e in entries) for k in entry["vr_buffers"]}
            m["num_params"] = entry["num_params"]
            m["num_params_whole"] = entry.get("num_params_whole", entry["num_params"])
            m["num_tensors"] = entry["num_tensors"]
            m["actual_strategy"] = entry.get("actual_strategy")
            m["moments"] = entry.get("moments", 1)
            m["wrapper"] = entry.get("wrapper")
            m["profile"] = entry.get("profile")
            coll: dict[tuple, list] = {}
            for e in entries:
                for c in e["collectives"]:
                    acc = coll.setdefault((c["op"], c["origin"]), [0, 0.0, 0.0])
                    acc[0] += c["calls"] / len(entries)
                    acc[1] += c["payload"] / len(entries)
                    acc[2] += c["ring"] / len(entries)
            m["collectives"] = [
                {"op": op, "origin": o, "calls": v[0], "payload": v[1], "ring": v[2]}
                for (op, o), v in sorted(coll.items())
            ]
            merged["variants"][name] = m
        blocks.append(merged)
    return blocks


def _mib(b):
    return b / 2**20


def summarize(blocks: list[dict], dp: int = 2, stage: int = 2) -> dict:
    """Medians, ratios to LAMB and VR's extra bytes per block and variant. ``dp``: data-parallel
    ranks, over which VR's reduction of Σg² runs (extra / limit is NaN for dp = 1: its limit is 0)."""
    rows = []
    for block in blocks:
        base = block["variants"][BASELINE]
        base_ring = sum(c["ring"] for c in base["collectives"])
        for variant in variants():
            e = block["variants"][variant.name]
            n = e["num_params"]
            # One fp32 reduce-scatter of N per moment VR keeps (Σg², and Σg in 16 bits).
            limit = 4 * n * (dp - 1) / dp * max(e.get("moments", 1), 1)
            ring = sum(c["ring"] for c in e["collectives"])
            row = {
                "precision": block["precision"],
                "gas": block["gas"],
                "variant": variant.name,
                "auto": variant.is_auto(block["gas"], stage),
                "strategy": e["actual_strategy"],
                "wrapper": e.get("wrapper"),
                "samples": len(e["total"]),
                "peak": e["peak_bytes"],
                "held": e["held_bytes"],
                "transient": benchlib.median(e["transient_bytes"]),
                "vr_buffers": e["vr_buffers"],
                "vr_buffer_total": sum(e["vr_buffers"].values()),
                "ring": ring,
                "payload": sum(c["payload"] for c in e["collectives"]),
                "calls": sum(c["calls"] for c in e["collectives"]),
                "extra_ring": ring - base_ring,
                "limit": limit,
                "extra_ratio": (ring - base_ring) / limit if limit else float("nan"),
                "tcp": e["tcp_bytes"],
                "tcp_extra_ratio": None
                if e["tcp_bytes"] is None
                else ((e["tcp_bytes"] - base["tcp_bytes"]) / limit if limit else float("nan")),
                "vr_ring": sum(c["ring"] for c in e["collectives"] if c["origin"].startswith("vrgd_ds")),
                "num_params": n,
                "num_params_whole": e.get("num_params_whole", n),
                "collectives": e["collectives"],
                "profile": e.get("profile"),
            }
            for key in TIMES + tuple("cpu_" + t for t in TIMES):
                row[key] = benchlib.median(e[key])
                row[key + "_ratio"] = row[key] / benchlib.median(base[key])
                row[key + "_paired_ratio"] = benchlib.median([a / b for a, b in zip(e[key], base[key])])
                row[key + "_iqr"] = _iqr(e[key])
            rows.append(row)
    return {"rows": rows}


def _iqr(xs):
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def _label(row):
    return row["variant"] + (" *" if row["auto"] else "")


def markdown(summary: dict, cfg: BenchConfig, meta: dict) -> str:
    rows = summary["rows"]
    out = []
    out.append(
        f"Model: BertForMaskedLM hidden {cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab}, seq {cfg.seq}, "
        f"micro-batch {cfg.micro_batch}/rank; N = {rows[0]['num_params']:,} parameters"
        + (
            f" per rank ({rows[0]['num_params_whole']:,} in the model; encoder linear layers split over "
            f"{cfg.tensor_parallel} tensor-parallel ranks)"
            if cfg.tensor_parallel > 1
            else ""
        )
        + f"; ZeRO-{cfg.stage}"
        + (" (BF16_Optimizer), " if cfg.bf16_optimizer else ", ")
        + (f"{cfg.world} CPU ranks (gloo)" if cfg.device == "cpu" else f"{cfg.world} GPU(s) (NCCL)")
        + (f", TP{cfg.tensor_parallel} × DP{cfg.dp}" if cfg.tensor_parallel > 1 else "")
        + f", {cfg.rounds} timed steps per variant (round-robin), "
        f'{cfg.warmup} warm-up step(s) + 1 counted step. `*` = what moment_reduction "auto" picks.'
    )
    out.append("")
    check = summary.get("tp_check")
    if check:
        out.append(
            f"Tensor-parallel model against the whole one (fp32, eval, one micro-batch; worst rank): loss "
            f"{check['loss_sharded']:.6f} vs {check['loss_whole']:.6f}, gradients' max relative error "
            f"{check['grad_max_rel_err']:.1e}."
        )
        out.append("")
    for kind, prefix, who in (("wall clock", "", "slower rank"), ("CPU time", "cpu_", "mean of the ranks")):
        t, fb, o = (prefix + key for key in TIMES)
        out.append(
            f"### Time per training step, {kind} (s; median over steps, {who}; ratios to LAMB in the same block)"
        )
        out.append("")
        out.append(
            "| precision | gas | optimizer | full step | fwd+bwd | opt step | full / LAMB | opt / LAMB "
            "| full / LAMB paired | opt / LAMB paired | IQR full | IQR opt |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            out.append(
                f"| {r['precision']} | {r['gas']} | {_label(r)} | {r[t]:.3f} | {r[fb]:.3f} | {r[o]:.3f} "
                f"| {r[t + '_ratio']:.3f} | {r[o + '_ratio']:.3f} | {r[t + '_paired_ratio']:.3f} "
                f"| {r[o + '_paired_ratio']:.3f} | {r[t + '_iqr']:.3f} | {r[o + '_iqr']:.3f} |"
            )
        out.append("")
    out.append(
        "### Memory per rank (MiB; larger rank; see the docstring for definitions"
        + ("; GPU memory allocated by torch)" if cfg.device == "cuda" else ")")
    )
    out.append("")
    out.append(
        "| precision | gas | optimizer | peak (build + warm-up) | held | step transient | VR buffers "
        "| VR buffers / (4N/dp) |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        part = 4 * r["num_params"] / cfg.dp
        out.append(
            f"| {r['precision']} | {r['gas']} | {_label(r)} | {_mib(r['peak']):.1f} | {_mib(r['held']):.1f} "
            f"| {_mib(r['transient']):.1f} | {_mib(r['vr_buffer_total']):.1f} | {r['vr_buffer_total'] / part:.2f} |"
        )
    out.append("")
    vr_rows = [r for r in rows if r["vr_buffers"]]
    if vr_rows:
        out.append("#### VR buffers in detail (per rank)")
        out.append("")
        out.append("| precision | gas | optimizer | buffer | MiB |")
        out.append("|---|---|---|---|---|")
        for r in vr_rows:
            for k, v in r["vr_buffers"].items():
                out.append(f"| {r['precision']} | {r['gas']} | {_label(r)} | {k} | {_mib(v):.2f} |")
        out.append("")
    out.append(
        "### Bytes sent per rank per step (ring model; limit = one fp32 reduce-scatter of N over the "
        "data-parallel group per moment VR reduces, 4N(dp-1)/dp for Σg², twice that in bf16 where Σg is "
        "reduced beside it)"
    )
    out.append("")
    out.append(
        "| precision | gas | optimizer | collectives | sent MiB | extra vs LAMB MiB | by vrgd_ds MiB "
        "| limit MiB | extra / limit | TCP sent MiB (gloo) | TCP extra / limit |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tcp = "n/a | n/a" if r["tcp"] is None else f"{_mib(r['tcp']):.3f} | {r['tcp_extra_ratio']:.3f}"
        out.append(
            f"| {r['precision']} | {r['gas']} | {_label(r)} | {r['calls']:.0f} | {_mib(r['ring']):.3f} "
            f"| {_mib(r['extra_ring']):.3f} | {_mib(r['vr_ring']):.3f} | {_mib(r['limit']):.3f} "
            f"| {r['extra_ratio']:.3f} | {tcp} |"
        )
    out.append("")
    out.append("#### Collectives of one step, VRLamb vs LAMB (calls, payload MiB, origin)")
    out.append("")
    out.append("| precision | gas | optimizer | op | origin | calls | payload MiB | sent MiB |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["variant"] == "AdamW":
            continue
        for c in r["collectives"]:
            out.append(
                f"| {r['precision']} | {r['gas']} | {_label(r)} | {c['op']} | {c['origin']} | {c['calls']:.0f} "
                f"| {_mib(c['payload']):.3f} | {_mib(c['ring']):.3f} |"
            )
    out.append("")
    out.append('### Targets (VRLamb with moment_reduction "auto" unless named)')
    out.append("")
    out.append("| check | precision | wall clock | CPU time | target | met (wall / CPU) |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        if r["variant"].startswith("VRLamb") and r["auto"] and r["gas"] == 4:
            out.append(
                _target_row(
                    f"full step / LAMB, gas 4 ({r['strategy']})",
                    r,
                    r["total_ratio"],
                    r["cpu_total_ratio"],
                    TARGETS["full_step_ratio_gas4"],
                )
            )
    for r in rows:
        if r["variant"].startswith("VRLamb") and r["auto"]:
            out.append(
                _target_row(
                    f"opt step / LAMB, gas {r['gas']} ({r['strategy']})",
                    r,
                    r["opt_ratio"],
                    r["cpu_opt_ratio"],
                    TARGETS["opt_step_ratio"],
                )
            )
    for r in rows:
        if r["variant"].startswith("VRLamb"):
            out.append(
                _target_row(
                    f"extra bytes / limit, gas {r['gas']}, {r['strategy']}{' (auto)' if r['auto'] else ''}",
                    r,
                    r["extra_ratio"],
                    None,
                    TARGETS["extra_bytes_ratio"],
                )
            )
    for r in rows:
        if r["variant"].startswith("VRLamb") and r["tcp"] is not None:
            out.append(
                _target_row(
                    f"extra TCP bytes on gloo / limit, gas {r['gas']}, {r['strategy']}{' (auto)' if r['auto'] else ''}",
                    r,
                    r["tcp_extra_ratio"],
                    None,
                    TARGETS["extra_bytes_ratio"],
                )
            )
    out.append("")
    out.append(
        f"Code: {meta['code']}. Machine: {meta['machine']}. "
        f"Max RSS of a rank over the whole run: {_mib(meta['max_rss']):.0f} MiB "
        f"(getrusage ru_maxrss). Wall time: {meta['wall_s']:.0f} s."
    )
    return "\n".join(out)


def profile_markdown(blocks: list[dict], top: int = 15) -> str:
    out = ["### Where the optimizer step's time goes (rank 0, one profiled step; torch.profiler self time of ops, s)"]
    for block in blocks:
        for name, e in block["variants"].items():
            prof = e.get("profile")
            if not prof:
                continue
            out += [
                "",
                (
                    f"**{block['precision']} gas {block['gas']} {name}**: opt step {prof['opt_step_s']:.3f} s under "
                    f"the profiler, {prof['total']:.3f} s of op self time attributed."
                ),
                "",
                "| function (innermost vrgd_ds, else DeepSpeed frame) | s | share |",
                "|---|---|---|",
            ]
            for owner, t in prof["functions"][:top]:
                out.append(f"| {owner} | {t:.3f} | {t / prof['total']:.1%} |")
            out += ["", "| function | op | s | calls |", "|---|---|---|---|"]
            for owner, op, t, n in prof["rows"][:top]:
                out.append(f"| {owner} | {op} | {t:.3f} | {n} |")
    return "\n".join(out)


def _target_row(check, r, wall, cpu, target):
    if cpu is None:  # bytes: one number (NaN with one rank: nothing to send)
        met = "n/a" if math.isnan(wall) else ("yes" if wall <= target else "NO")
        return f"| {check} | {r['precision']} | {wall:.3f} | – | ≤ {target} | {met} |"
    met = "/".join("yes" if v <= target else "NO" for v in (wall, cpu))
    return f"| {check} | {r['precision']} | {wall:.3f} | {cpu:.3f} | ≤ {target} | {met} |"


def machine_text(bf16_matmul: str, cfg: BenchConfig | None = None) -> str:
    world = WORLD_SIZE if cfg is None else cfg.world
    versions = benchlib.versions("torch", "Python", "deepspeed")
    if cfg is not None and cfg.device == "cuda":
        return (
            f"{world} × {torch.cuda.get_device_name(0)} (NCCL), {os.cpu_count()} CPU cores; {versions} "
            f"(CUDA {torch.version.cuda}); native bf16"
        )
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {world} ranks × 1 thread, "
        f"gloo; {versions}; "
        f"bf16 matmuls {'in fp32 (--bf16-matmul fp32)' if bf16_matmul == 'fp32' else 'native'}"
    )


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig the command line asks for (``parser.error`` on an impossible one)."""
    cfg = QUICK if args.quick else SIZES[args.size]
    world = args.world_size or (WORLD_SIZE if args.device == "cpu" else 1)
    if world < 1:
        parser.error("--world-size must be >= 1")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        if world > torch.cuda.device_count():
            parser.error(f"--world-size {world}: only {torch.cuda.device_count()} GPU(s)")
    changes = {"world": world, "device": args.device, "stage": args.zero_stage}
    if args.bf16_optimizer:
        if args.precisions not in (None, "bf16"):
            parser.error("--bf16-optimizer runs bf16 only; drop --precisions or use --precisions bf16")
        changes.update(stage=1, bf16_optimizer=True, precisions=("bf16",))
    if args.micro_batch is not None:
        changes["micro_batch"] = args.micro_batch
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.precisions:
        changes["precisions"] = tuple(p.strip() for p in args.precisions.split(","))
        bad = set(changes["precisions"]) - {"fp32", "bf16"}
        if bad:
            parser.error(f"unknown precision(s) {sorted(bad)}; use fp32 and/or bf16")
    if args.accumulations:
        changes["accumulations"] = tuple(int(a) for a in args.accumulations.split(","))
        if any(a < 1 for a in changes["accumulations"]):
            parser.error("accumulation steps must be >= 1")
    tp = args.tensor_parallel
    if tp < 1 or world % tp:
        parser.error(f"--tensor-parallel {tp} must be >= 1 and divide the world size {world}")
    if tp > 1:
        if cfg.heads % tp or cfg.intermediate % tp:
            parser.error(
                f"--tensor-parallel {tp} must divide the attention heads ({cfg.heads}) and the FFN width "
                f"({cfg.intermediate})"
            )
        changes["tensor_parallel"] = tp
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.dp * min(cfg.accumulations) < 2:
        parser.error(
            f"VR needs k = data-parallel ranks x accumulation steps >= 2 gradient samples per step; "
            f"{cfg.dp} data-parallel rank(s) with accumulation {min(cfg.accumulations)} gives k = "
            f"{cfg.dp * min(cfg.accumulations)} (pass --accumulations)"
        )
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (CI smoke run); = --size quick")
    parser.add_argument(
        "--host-proxy",
        action="store_true",
        help="instead: VR's host work (ops dispatched, host reads, CPU time) per micro-batch and per step, "
        "BERT-large's tensor list at width 32, bf16, gas 16, one rank, every wrapper kind (scripts/host_proxy.py); "
        "with --quick 2 and 4 layers, ZeRO-2 only",
    )
    parser.add_argument("--layers", default=None, help="--host-proxy: comma list of layer counts (default: 24,48)")
    parser.add_argument(
        "--moment-reduction",
        choices=("per_step", "per_micro_step"),
        default=None,
        help="--host-proxy: VR's moment_reduction (default: auto, per_micro_step at one rank)",
    )
    parser.add_argument(
        "--wrappers",
        default=None,
        help="--host-proxy: comma list of wrapper kinds (stage0,zero1,zero2,zero3,bf16_optimizer; default: all)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="full: BERT-base width, 4 layers, fp32+bf16, gas 1,4 (default); large: BERT-large "
        "(24 layers), bf16, gas 16, micro-batch 32, for GPUs; quick: the smoke run",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: ranks over gloo (default); cuda: one GPU per rank, NCCL",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help=f"ranks (default: {WORLD_SIZE} on CPU, 1 on CUDA); on CUDA at most the GPU count",
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="micro-batch per rank (default: the size's)")
    parser.add_argument(
        "--zero-stage",
        type=int,
        choices=(1, 2, 3),
        default=2,
        help='ZeRO stage (default 2; at 3, moment_reduction "auto" is per_micro_step)',
    )
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="T",
        help="Megatron-style tensor parallelism of the encoder's linear layers over T consecutive ranks "
        "(default 1: none); world size / T data-parallel ranks. Precision and stage are passed through: "
        "what vrgd_ds refuses with tensor parallelism fails at deepspeed.initialize",
    )
    parser.add_argument(
        "--bf16-optimizer",
        action="store_true",
        help="bf16 + ZeRO-1 + fp32 gradient accumulation (DeepSpeed's BF16_Optimizer); implies --precisions bf16",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default: 6; quick: 2)")
    parser.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default: both)")
    parser.add_argument(
        "--accumulations", default=None, help="comma list of gradient accumulation steps (default: 1,4)"
    )
    parser.add_argument(
        "--bf16-matmul",
        choices=("fp32", "native"),
        default="fp32",
        help="compute bf16 matrix products in fp32 (default; see the docstring) or natively",
    )
    parser.add_argument("--json", type=Path, default=None, help="write raw per-rank results and the summary here")
    parser.add_argument("--report", type=Path, default=None, help="write the markdown tables here too")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed rounds, profile one optimizer step per variant on rank 0 (torch.profiler)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the ranks are killed")
    parser.add_argument(
        "--anchors",
        action="store_true",
        help='also time DeepSpeed\'s FusedLamb ("type": "Lamb") and torch\'s fused AdamW (GPUs only)',
    )
    parser.add_argument(
        "--stats-cost",
        action="store_true",
        help="also run VR-LAMB per_step with gradient_stats off (the noise statistics' cost = ratio of the two)",
    )
    args = parser.parse_args(argv)
    if args.stats_cost:
        os.environ[STATS_COST_ENV] = "1"  # read by variants(), here and in the spawned ranks
    if args.anchors:
        if args.device != "cuda":
            parser.error("--anchors needs --device cuda (FusedLamb and fused AdamW are GPU kernels)")
        os.environ[ANCHORS_ENV] = "1"

    if args.host_proxy:
        return host_proxy_main(args, argv)
    cfg = config_from_args(parser, args)
    if BASELINE not in {v.name for v in VARIANTS}:
        raise RuntimeError("the baseline variant is missing")

    from vrgd_ds.multiproc import run_ranks

    timeout = args.timeout or (300 if args.quick else 4 * 3600)
    version = benchlib.code_version()  # before the ranks import vrgd_ds
    start = time.time()
    per_rank = run_ranks(
        rank_body,
        cfg.world,
        dataclasses.asdict(cfg),
        args.bf16_matmul,
        args.profile,
        timeout=timeout,
        init="torch",
        backend="gloo" if cfg.device == "cpu" else "nccl",
        # CPU: 1 thread per rank (2 ranks share 2 busy cores); GPU: the host-side work
        # (model construction, DeepSpeed's bookkeeping) may use a few cores.
        env=None
        if cfg.device == "cpu"
        else {"OMP_NUM_THREADS": str(max(1, min(8, (os.cpu_count() or 1) // cfg.world)))},
    )
    wall = time.time() - start
    blocks = merge_ranks(per_rank)
    summary = summarize(blocks, cfg.dp, cfg.stage)
    if cfg.tensor_parallel > 1:
        # the worst rank's check
        summary["tp_check"] = max((r["tp_check"] for r in per_rank), key=lambda c: c["grad_max_rel_err"])
    meta = {
        **benchlib.run_meta(
            machine_text(args.bf16_matmul, cfg), wall, argv, ("torch", "Python", "deepspeed"), code=version
        ),
        "max_rss": max(r["max_rss_bytes"] for r in per_rank),
        "peak_resettable": all(r["peak_resettable"] for r in per_rank),
    }
    if not meta["peak_resettable"]:
        print("warning: /proc/self/clear_refs is not writable: peak figures include earlier engines", file=sys.stderr)
    text = markdown(summary, cfg, meta)
    if args.profile:
        text += "\n\n" + profile_markdown(blocks)
    print(text)
    if args.report:
        benchlib.write_text(args.report, text)
    if args.json:
        benchlib.write_json(
            args.json, {"config": dataclasses.asdict(cfg), "meta": meta, "per_rank": per_rank, "summary": summary}
        )
    return 0


def host_proxy_main(args, argv) -> int:
    """``--host-proxy``: scripts/host_proxy.py's measurement, its table and JSON."""
    import host_proxy

    if args.layers:
        layers = tuple(int(n) for n in args.layers.split(","))
    else:
        layers = (2, 4) if args.quick else (24, 48)
    if args.wrappers:
        wrappers = tuple(args.wrappers.split(","))
        unknown = set(wrappers) - set(host_proxy.WRAPPERS)
        if unknown:
            raise SystemExit(f"--wrappers: unknown {sorted(unknown)}; choose from {list(host_proxy.WRAPPERS)}")
    else:
        wrappers = ("zero2",) if args.quick else tuple(host_proxy.WRAPPERS)
    rounds = args.rounds or (1 if args.quick else 3)
    version = benchlib.code_version()
    start = time.time()
    options = {"moment_reduction": args.moment_reduction} if args.moment_reduction else None
    rows = host_proxy.run(layers, wrappers, rounds, say=lambda text: print(text, flush=True), options=options)
    meta = benchlib.run_meta(
        "host proxy (see scripts/host_proxy.py), one CPU rank",
        time.time() - start,
        argv,
        ("torch", "Python", "deepspeed", "transformers"),
        code=version,
    )
    text = host_proxy.markdown(rows)
    print(text)
    if args.report:
        benchlib.write_text(args.report, text)
    if args.json:
        benchlib.write_json(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
