"""VR's host work per micro-batch and per step, measured without a GPU (``bench_overhead.py --host-proxy``).

On a GPU, BERT-large's step is host-bound at small per-GPU batches: every operator vrgd_ds
dispatches is a kernel launch (~10 µs of host time) and every scalar it reads back is a device
sync. This proxy counts exactly that on the CPU, where it can run in CI: a BERT with
BERT-large's tensor list (24 layers, 394 tensors; 48 layers for the scaling check) at hidden
width 32, so that compute is negligible; bf16, gradient accumulation 16, one rank; each DeepSpeed
wrapper kind (stage 0 = FP16_UnfusedOptimizer, ZeRO-1, ZeRO-2, ZeRO-3, BF16_Optimizer); VR-LAMB
(``moment_reduction`` as ``"auto"`` picks it: per_micro_step at one rank) against the same run
with ``vr: false``.

Measured per variant, on one optimizer step after a warm-up step:

* ``ops_per_micro_batch``: operators dispatched during ``engine.backward`` of a micro-batch that
  is not the accumulation boundary, in total and credited to vrgd_ds — the innermost Python frame
  outside torch belongs to the vrgd_ds package (a ``TorchDispatchMode`` sees every aten call,
  also those made from autograd hooks). Views (slicing, reshaping: no kernel on a device) are
  counted apart (``views_per_*``);
* ``ops_per_step``: the same during ``engine.step()`` at the boundary;
* ``device_reads_per_step``: vrgd_ds's device → host reads, counted where they are made
  (:func:`vrgd_ds.host.read`, the one door for them): on a GPU each is a device sync. (On the CPU
  every tensor is on the host, so a dispatch mode cannot tell a device read from a read of values
  already brought back; ``syncs_per_step`` still counts vrgd_ds's dispatched scalar reads —
  ``aten._local_scalar_dense``, ``nonzero`` — which after the change are reads of host copies.)
* ``vr_buckets_per_micro_batch``: the gradient buckets VR's samples were added in (ZeRO-2's
  own, :mod:`vrgd_ds.deepspeed_glue.ipg_buckets`; held hook samples elsewhere);
* ``vr_code_ms_per_micro_batch``: CPU time inside vrgd_ds's own entry points in a micro-batch's
  backward (:class:`VRCodeClock`), its operators included;
* ``host_ms_per_micro_batch``: CPU time of ``engine.backward`` of a non-boundary micro-batch, VR
  minus ``vr: false``, paired round by round (the two engines alternate) and summarized by the
  median — without the dispatch mode, which would slow both. On the CPU it includes the
  arithmetic of vrgd_ds's operators (two passes over the gradients: on a GPU, queued kernels),
  measured apart as ``op_ms_per_micro_batch``; the difference is the host's bookkeeping.

Targets (the project's issue on host work): ≤ 2 ops per gradient bucket per micro-batch at
ZeRO-2 (≤ 2 foreach ops per bucket elsewhere); VR's step ops the same at 24 and 48 layers; ≤ 1
device-sync op per step from VR; ≤ 0.5 ms of host CPU per micro-batch.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

WRAPPERS = {  # label: (ZeRO stage, extra DeepSpeed config)
    "stage0": (0, {}),
    "zero1": (1, {}),
    "zero2": (2, {}),
    "zero3": (3, {}),
    "bf16_optimizer": (1, {"data_types": {"grad_accum_dtype": "fp32"}}),
}
GAS = 16
MICRO_BATCH = 2
SEQ = 16
#: Extra optimizer params (``--moment-reduction``), set by bench_overhead before the run.
OPTIONS: dict = {}
SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item")


def _package_dir(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__)) + os.sep


class OpCounter(TorchDispatchMode):
    """Counts aten calls by owner: the package of the innermost Python frame outside torch and
    this file ("vrgd_ds", "deepspeed" or "other"), and vrgd_ds's host reads separately."""

    def __init__(self):
        super().__init__()
        import deepspeed

        import vrgd_ds

        self.roots = (("vrgd_ds", _package_dir(vrgd_ds)), ("deepspeed", _package_dir(deepspeed)))
        self.skip = (_package_dir(torch), os.path.abspath(__file__))
        self.counts = {"vrgd_ds": 0, "deepspeed": 0, "other": 0}
        self.views = dict.fromkeys(self.counts, 0)
        self.vr_syncs = 0
        self.vr_ops: dict[str, int] = {}
        #: CPU seconds inside vrgd_ds's operators (their arithmetic: asynchronous kernels on a GPU).
        self.vr_op_s = 0.0

    def _owner(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if not path.startswith(self.skip):
                for name, root in self.roots:
                    if path.startswith(root):
                        return name
                return "other"
            frame = frame.f_back
        return "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        owner = self._owner()
        if func.is_view:  # a view: metadata only, no kernel on a device
            self.views[owner] += 1
            return func(*args, **(kwargs or {}))
        self.counts[owner] += 1
        if owner == "vrgd_ds":
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            self.vr_op_s += time.perf_counter() - t0
            self._note_vr(func, args, kwargs)
            return out
        return func(*args, **(kwargs or {}))

    def _note_vr(self, func, args, kwargs) -> None:
        name = func.__name__.split(".")[0]
        self.vr_ops[name] = self.vr_ops.get(name, 0) + 1
        to_host = (
            name in ("_to_copy", "copy_")
            and any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
            and str((kwargs or {}).get("device", "")) == "cpu"
        )
        if name in SYNC_OPS or to_host:
            self.vr_syncs += 1

    def take(self) -> dict:
        out = {
            **self.counts,
            "vr_views": self.views["vrgd_ds"],
            "vr_syncs": self.vr_syncs,
            "vr_ops": dict(sorted(self.vr_ops.items())),
            "vr_op_ms": 1e3 * self.vr_op_s,
        }
        self.counts = dict.fromkeys(self.counts, 0)
        self.views = dict.fromkeys(self.counts, 0)
        self.vr_syncs = 0
        self.vr_ops = {}
        self.vr_op_s = 0.0
        return out


@contextmanager
def counting(counter: OpCounter | None):
    if counter is None:
        yield
        return
    with counter:
        yield


def bert(layers: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(cfg)


def engine_for(layers: int, wrapper: str, vr: bool):
    import deepspeed

    import vrgd_ds  # noqa: F401  (registers the optimizer types)

    stage, extra = WRAPPERS[wrapper]
    config = {
        "train_batch_size": MICRO_BATCH * GAS,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "VRLamb", "params": {"lr": 1e-3, "weight_decay": 0.01, "vr": vr, **OPTIONS}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        **extra,
    }
    model = bert(layers)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def batches(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 128, (MICRO_BATCH, SEQ), generator=g),
            "labels": torch.randint(0, 128, (MICRO_BATCH, SEQ), generator=g),
        }
        for _ in range(count)
    ]


class VRCodeClock:
    """CPU time spent inside vrgd_ds's own entry points during backward — the hooks (through
    ``MicroBatchSamples.add``), the end of each pass (``end_micro_batch``, which adds held
    samples), ZeRO-2's bucket hook (``_add_buckets``) and ZeRO-3's (``before_zero_reduces``) —
    inclusive of the operators they dispatch. Not in it: autograd's own cost of calling a Python
    hook per tensor (in the paired difference, not here)."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0

    def install(self) -> None:
        from vrgd_ds.deepspeed_glue.zero3 import Zero3MomentSource
        from vrgd_ds.deepspeed_glue.zero12 import ZeroMomentSource
        from vrgd_ds.samples import MicroBatchSamples

        for cls, name in (
            (MicroBatchSamples, "add"),
            (MicroBatchSamples, "end_micro_batch"),
            (ZeroMomentSource, "_add_buckets"),
            (Zero3MomentSource, "before_zero_reduces"),
        ):
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:  # outermost only: nested entries are inside it
                    self.seconds += time.process_time() - t0

        return timed


CLOCK = VRCodeClock()


def one_step(engine, data, counter: OpCounter | None) -> dict:
    """One optimizer step; per non-boundary micro-batch its CPU time (and op counts), then the step's."""
    from vrgd_ds import host

    out = {"backward_cpu_s": [], "micro": [], "step": None, "device_reads_micro": 0, "device_reads_step": 0}
    out["vr_code_s"] = []
    for i, batch in enumerate(data):
        loss = engine(**batch).loss
        t0 = time.process_time()
        reads0 = host.reads()
        code0 = CLOCK.seconds
        with counting(counter):
            engine.backward(loss)
        t1 = time.process_time()
        if 0 < i < len(data) - 1:
            out["vr_code_s"].append(CLOCK.seconds - code0)
        out["device_reads_micro"] += host.reads() - reads0
        boundary = i == len(data) - 1
        if counter is not None:
            counts = counter.take()
            if 0 < i < len(data) - 1:
                out["micro"].append(counts)
        if not boundary and i > 0:
            out["backward_cpu_s"].append(t1 - t0)
        reads0 = host.reads()
        with counting(counter if boundary else None):
            engine.step()
        out["device_reads_step"] += host.reads() - reads0
        if boundary and counter is not None:
            out["step"] = counter.take()
    return out


def measure(rank: int, world: int, layers: int, wrapper: str, rounds: int, options: dict | None = None) -> dict:
    """Rank body: both engines (VR, vr=false) of one (layers, wrapper), counted, then timed."""
    OPTIONS.update(options or {})
    data = batches(GAS)
    CLOCK.install()
    engines = {"vr": engine_for(layers, wrapper, True), "base": engine_for(layers, wrapper, False)}
    tensors = sum(1 for p in engines["vr"].module.parameters() if p.requires_grad)
    result = {"layers": layers, "wrapper": wrapper, "tensors": tensors}
    for name, engine in engines.items():
        one_step(engine, data, None)  # warm-up: state created, buffers allocated
        buckets = getattr(engine.basic_optimizer.moment_source, "buckets", None)
        added_before = 0 if buckets is None else buckets.runs_total + buckets.foreach_total
        counted = one_step(engine, data, OpCounter())
        micro = counted["micro"]
        result[name] = {
            "ops_per_micro_batch": statistics.median(m["vrgd_ds"] for m in micro),
            "all_ops_per_micro_batch": statistics.median(
                sum(m[k] for k in ("vrgd_ds", "deepspeed", "other")) for m in micro
            ),
            "views_per_micro_batch": statistics.median(m["vr_views"] for m in micro),
            # CPU time of vrgd_ds's operators in a micro-batch's backward: on the CPU their
            # arithmetic runs in the call; on a GPU it is queued, and the host pays the launches.
            "op_ms_per_micro_batch": statistics.median(m["vr_op_ms"] for m in micro),
            "ops_per_step": counted["step"]["vrgd_ds"],
            "views_per_step": counted["step"]["vr_views"],
            "syncs_per_step": counted["step"]["vr_syncs"],
            # vrgd_ds's device -> host reads (vrgd_ds.host.read: one device sync each on a GPU).
            "device_reads_per_step": counted["device_reads_step"],
            "device_reads_per_backward": counted["device_reads_micro"] / len(data),
            "step_ops_by_name": counted["step"]["vr_ops"],
            "micro_ops_by_name": micro[0]["vr_ops"],
        }
        if name == "vr":
            source = engine.basic_optimizer.moment_source
            result["strategy"] = getattr(source, "strategy", None)
            # ZeRO-2's gradient buckets VR added per micro-batch (vrgd_ds/deepspeed_glue/ipg_buckets.py);
            # None where the samples come from per-tensor hooks.
            result["vr_buckets_per_micro_batch"] = (
                None if buckets is None else (buckets.runs_total + buckets.foreach_total - added_before) / GAS
            )
            result["vr_bucket_layout_misses"] = None if buckets is None else buckets.fallbacks_total
    paired, code = [], []
    for _ in range(rounds):
        runs = {name: one_step(engine, data, None) for name, engine in engines.items()}
        times = {name: run["backward_cpu_s"] for name, run in runs.items()}
        paired += [v - b for v, b in zip(times["vr"], times["base"])]
        code += runs["vr"]["vr_code_s"]
    # CPU time inside vrgd_ds's own code per micro-batch (VRCodeClock), its operators included.
    result["vr_code_ms_per_micro_batch"] = 1e3 * statistics.median(code)
    result["host_ms_added_per_micro_batch"] = 1e3 * statistics.median(paired)
    q = statistics.quantiles(paired, n=4) if len(paired) >= 4 else [min(paired), 0, max(paired)]
    result["host_ms_added_iqr"] = [1e3 * q[0], 1e3 * q[-1]]
    return result


def run(layer_counts=(24, 48), wrappers=tuple(WRAPPERS), rounds: int = 3, say=print, options=None) -> list[dict]:
    from vrgd_ds.multiproc import run_ranks

    rows = []
    for layers in layer_counts:
        for wrapper in wrappers:
            t0 = time.time()
            (row,) = run_ranks(measure, 1, layers, wrapper, rounds, options, init="deepspeed", timeout=1800)
            say(
                f"[{time.time() - t0:6.0f} s] {layers} layers {wrapper}: VR ops/micro-batch "
                f"{row['vr']['ops_per_micro_batch']} (base {row['base']['ops_per_micro_batch']}), step ops "
                f"{row['vr']['ops_per_step']} (base {row['base']['ops_per_step']}), device reads "
                f"{row['vr']['device_reads_per_step']} (scalar ops {row['vr']['syncs_per_step']}), "
                f"+{row['host_ms_added_per_micro_batch']:.2f} ms/micro-batch"
            )
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| layers | tensors | wrapper | strategy | VR buckets / micro-batch | vrgd_ds ops / micro-batch (vr: false) "
        "| all ops / micro-batch (vr: false) | vrgd_ds ops / step (vr: false) | device reads / step (vr: false) "
        "| host ms added / micro-batch (IQR) | in vrgd_ds's code, ms | of which its operators' arithmetic, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v, b = r["vr"], r["base"]
        lo, hi = r["host_ms_added_iqr"]
        lines.append(
            f"| {r['layers']} | {r['tensors']} | {r['wrapper']} | {r.get('strategy')} "
            f"| {r.get('vr_buckets_per_micro_batch') if r.get('vr_buckets_per_micro_batch') is not None else '–'} "
            f"| {v['ops_per_micro_batch']:.0f} ({b['ops_per_micro_batch']:.0f}) "
            f"| {v['all_ops_per_micro_batch']:.0f} ({b['all_ops_per_micro_batch']:.0f}) "
            f"| {v['ops_per_step']} ({b['ops_per_step']}) "
            f"| {v['device_reads_per_step']} ({b['device_reads_per_step']}) "
            f"| {r['host_ms_added_per_micro_batch']:.2f} ({lo:.2f}…{hi:.2f}) "
            f"| {r['vr_code_ms_per_micro_batch']:.2f} | {v['op_ms_per_micro_batch']:.2f} |"
        )
    return "\n".join(lines)
