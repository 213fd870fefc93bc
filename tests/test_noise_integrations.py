"""Where users see the gradient-noise statistics: DeepSpeed's monitor (vrgd_ds.monitor.log_noise_stats),
the long-format per-tensor CSV (LongCSVWriter) and the HF Trainer callback (vrgd_ds.hf).

Fake engines and optimizers whose ``noise_stats()`` returns a fixed dict; the real optimizer's
statistics are tested in test_noise_math.py and, wired into the step, with the optimizer.
"""

from __future__ import annotations

import copy
import csv
import math
import subprocess
import sys

import pytest
import torch
import transformers  # a dependency of the package (vrgd_ds itself does not import it)

from vrgd_ds import VRSGD
from vrgd_ds.monitor import (
    GLOBAL_KEYS,
    LongCSVWriter,
    find_noise_source,
    log_noise_stats,
    noise_events,
)

STATS = {
    "k": 8,
    "micro_batch_size": 4,
    "grad_norm_sq": 0.5,
    "noise_trace": 40.0,
    "b_simple": 80.0,
    "b_simple_ema": 75.0,
    "per_tensor": {
        "layer.weight": {"grad_norm_sq": 0.4, "noise_trace": 30.0, "b_simple": 75.0, "gsnr_unbiased_mean": 0.25},
        "layer.bias": {"grad_norm_sq": 0.1, "noise_trace": 10.0, "b_simple": float("nan")},
    },
}


class FakeVROptimizer:
    def __init__(self, stats):
        self.stats = stats

    def noise_stats(self):
        return self.stats


class Wrapper:
    """Stands for DeepSpeed's ZeRO optimizer / accelerate's AcceleratedOptimizer: ``.optimizer``."""

    def __init__(self, inner):
        self.optimizer = inner


class FakeMonitor:
    def __init__(self, enabled=True):
        self.enabled = enabled
        self.events = []

    def write_events(self, event_list):
        self.events.extend(event_list)


class FakeEngine:
    def __init__(self, stats, global_samples=96, monitor=None):
        self.optimizer = Wrapper(FakeVROptimizer(stats))
        self.global_samples = global_samples
        self.monitor = monitor if monitor is not None else FakeMonitor()


def _read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ---- DeepSpeed monitor -----------------------------------------------------------------------
def test_log_noise_stats_writes_global_scalars_at_global_samples():
    engine = FakeEngine(STATS, global_samples=96)
    events = log_noise_stats(engine)
    assert engine.monitor.events == events
    assert events == [
        ("Train/Samples/noise/k", 8.0, 96),
        ("Train/Samples/noise/grad_norm_sq", 0.5, 96),
        ("Train/Samples/noise/noise_trace", 40.0, 96),
        ("Train/Samples/noise/b_simple", 80.0, 96),
        ("Train/Samples/noise/b_simple_ema", 75.0, 96),
    ]
    assert all(type(value) is float for _, value, _ in events)


def test_log_noise_stats_per_tensor_prefix_and_explicit_step():
    engine = FakeEngine(STATS)
    events = log_noise_stats(engine, step=7, per_tensor=True, prefix="noise/")
    names = [name for name, _, _ in events]
    assert {step for _, _, step in events} == {7}
    assert "noise/layer.weight/gsnr_unbiased_mean" in names and "noise/layer.bias/noise_trace" in names
    assert "noise/layer.bias/gsnr_unbiased_mean" not in names  # absent keys are left out
    bias_b = {n: v for n, v, _ in events}["noise/layer.bias/b_simple"]
    assert math.isnan(bias_b)  # NaN is a value; only None is dropped


def test_log_noise_stats_before_the_first_step_and_without_monitor():
    for empty in (None, {}):
        engine = FakeEngine(empty)
        assert log_noise_stats(engine) == [] and engine.monitor.events == []
    engine = FakeEngine(STATS, monitor=FakeMonitor(enabled=False))  # no monitor section in the config
    assert log_noise_stats(engine) == [] and engine.monitor.events == []


def test_log_noise_stats_with_an_optimizer_needs_monitor_and_step():
    opt = FakeVROptimizer(STATS)
    with pytest.raises(ValueError, match="monitor="):
        log_noise_stats(opt)
    with pytest.raises(ValueError, match="step=.*global_samples"):
        log_noise_stats(opt, monitor=FakeMonitor())
    monitor = FakeMonitor()
    assert len(log_noise_stats(opt, monitor=monitor, step=3)) == 5 and len(monitor.events) == 5


def test_log_noise_stats_without_vr_optimizer_names_the_fix():
    plain = Wrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(ValueError, match="vrgd_ds optimizer type"):
        log_noise_stats(plain, monitor=FakeMonitor(), step=1)


def test_find_noise_source_finds_a_real_vr_optimizer_inside_wrappers():
    model = torch.nn.Linear(3, 2)
    opt = VRSGD(model.named_parameters(), lr=0.1)
    engine = Wrapper(Wrapper(opt))
    assert find_noise_source(engine) is opt
    opt.noise_stats = lambda: STATS  # the statistics themselves are the optimizer's job
    monitor = FakeMonitor()
    log_noise_stats(engine, monitor=monitor, step=12)
    assert ("Train/Samples/noise/b_simple", 80.0, 12) in monitor.events


def test_noise_events_keys_cover_build_noise_stats():
    from vrgd_ds.noise import NoiseScaleEMA, build_noise_stats

    stats = build_noise_stats(["w"], [9.0], [5.0], 2, 3, NoiseScaleEMA(), gsnr_unbiased_mean=[0.1], numels=[4])
    names = [name.split("/")[-1] for name, _, _ in noise_events(stats, 1)]
    assert names == list(GLOBAL_KEYS)


# ---- long-format CSV -------------------------------------------------------------------------
def test_long_csv_writer_appends_one_header_flushes_and_resumes(tmp_path):
    path = tmp_path / "sub" / "noise.csv"
    writer = LongCSVWriter(path, rank=0)
    writer.write_noise_stats(STATS, step=32)
    rows = _read_rows(path)  # flushed: readable before close
    assert rows[0] == ["step", "tensor", "name", "value"]
    body = rows[1:]
    assert ["32", "*", "b_simple_ema", "75.0"] in body
    assert ["32", "layer.weight", "gsnr_unbiased_mean", "0.25"] in body
    assert ["32", "layer.bias", "b_simple", "nan"] in body
    assert not any(r[1] == "*" and r[2] == "micro_batch_size" for r in body)
    assert not any(r[1] == "layer.bias" and r[2] == "gsnr_unbiased_mean" for r in body)  # absent: no row
    assert len(body) == 5 + 4 + 3
    writer.write_noise_stats(STATS, step=64)
    writer.write_noise_stats({}, step=96)  # before the first step: nothing
    writer.close()
    with LongCSVWriter(path, rank=0) as resumed:  # a resumed run appends to the same file
        resumed.write(128, [("layer.weight", "b_simple", 70.0), ("layer.bias", "b_simple", None)])
    rows = _read_rows(path)
    assert sum(r == ["step", "tensor", "name", "value"] for r in rows) == 1
    assert [r[0] for r in rows[1:]] == ["32"] * 12 + ["64"] * 12 + ["128"]
    assert rows[-1] == ["128", "layer.weight", "b_simple", "70.0"]


def test_long_csv_writer_only_rank_zero_writes(tmp_path):
    path = tmp_path / "noise.csv"
    writer = LongCSVWriter(path, rank=1)
    writer.write_noise_stats(STATS, step=1)
    writer.write(1, [("a", "b", 1.0)])
    writer.close()
    assert not path.exists()


def test_long_csv_writer_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("step,loss\n1,2.0\n")
    with pytest.raises(ValueError, match="choose another path"):
        LongCSVWriter(path, rank=0).write(1, [("a", "b", 1.0)])
    assert path.read_text() == "step,loss\n1,2.0\n"


def test_log_noise_stats_also_feeds_the_csv_writer(tmp_path):
    engine = FakeEngine(STATS, global_samples=256)
    with LongCSVWriter(tmp_path / "n.csv", rank=0) as writer:
        log_noise_stats(engine, csv_writer=writer)
    rows = _read_rows(tmp_path / "n.csv")
    assert {r[0] for r in rows[1:]} == {"256"} and ["256", "layer.weight", "noise_trace", "30.0"] in rows


# ---- HF Trainer callback ---------------------------------------------------------------------


class Recorder(transformers.TrainerCallback):
    """Stands for a report_to integration (TensorBoard, W&B): records what on_log sees."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


class FakeTrainer:
    def __init__(self, callbacks, optimizer):
        self.callback_handler = transformers.trainer_callback.CallbackHandler(callbacks, None, None, optimizer, None)
        self.state = transformers.TrainerState()
        self.control = transformers.TrainerControl()

    def log(self, logs):
        """What Trainer.log does: history entry first, then the callbacks."""
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(None, self.state, self.control, logs)


def test_hf_callback_adds_global_stats_to_logs_history_and_integrations():
    from vrgd_ds.hf import NoiseStatsCallback, add_noise_stats_callback

    recorder = Recorder()
    trainer = FakeTrainer([recorder], optimizer=Wrapper(Wrapper(FakeVROptimizer(STATS))))
    callback = add_noise_stats_callback(trainer)
    assert isinstance(callback, NoiseStatsCallback) and trainer.callback_handler.callbacks[0] is callback
    trainer.state.global_step = 5
    logs = {"loss": 2.5, "grad_norm": 1.0, "learning_rate": 1e-3}
    trainer.log(logs)
    expected = {
        "noise/k": 8,
        "noise/grad_norm_sq": 0.5,
        "noise/noise_trace": 40.0,
        "noise/b_simple": 80.0,
        "noise/b_simple_ema": 75.0,
    }
    assert {k: logs[k] for k in expected} == expected and type(logs["noise/k"]) is int
    assert "noise/micro_batch_size" not in logs and "noise/per_tensor" not in logs
    assert recorder.seen[-1] == logs  # the integration, registered earlier, saw the values
    assert trainer.state.log_history[-1] == {**logs, "step": 5}


def test_hf_callback_appended_late_still_fills_history_but_not_earlier_integrations():
    from vrgd_ds.hf import NoiseStatsCallback

    recorder = Recorder()
    trainer = FakeTrainer([recorder, NoiseStatsCallback(prefix="gns_")], optimizer=FakeVROptimizer(STATS))
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["gns_b_simple"] == 80.0
    assert "gns_b_simple" not in recorder.seen[-1]  # why add_noise_stats_callback inserts first


def test_hf_callback_skips_eval_logs_empty_stats_and_uses_an_explicit_optimizer():
    from vrgd_ds.hf import NoiseStatsCallback

    trainer = FakeTrainer([NoiseStatsCallback()], optimizer=FakeVROptimizer(STATS))
    eval_logs = {"eval_loss": 1.5}
    trainer.log(eval_logs)
    assert eval_logs == {"eval_loss": 1.5}  # an evaluation log has no optimizer step behind it

    trainer = FakeTrainer([NoiseStatsCallback()], optimizer=FakeVROptimizer({}))
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs == {"loss": 1.0}  # before the first step

    stats = copy.deepcopy(STATS)
    stats["b_simple_ema"] = None
    explicit = NoiseStatsCallback(optimizer=Wrapper(FakeVROptimizer(stats)), keys=("b_simple", "b_simple_ema"))
    trainer = FakeTrainer([explicit], optimizer=None)
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs == {"loss": 1.0, "noise/b_simple": 80.0}

    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # not a VR optimizer: nothing
    trainer = FakeTrainer([NoiseStatsCallback()], optimizer=plain)
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs == {"loss": 1.0}


def test_importing_vrgd_ds_does_not_import_transformers():
    code = (
        "import sys, vrgd_ds, vrgd_ds.noise, vrgd_ds.monitor; "
        "assert 'transformers' not in sys.modules, 'vrgd_ds imported transformers'"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
