"""Every DeepSpeed config in configs/ validates, and its batch arithmetic holds for its GPU count.

Each config documents the number of GPUs (or CPU ranks) it is written for in its ``_comment``
("... 64 GPUs ..." / "... 2 ranks ..."); the paper configs also carry it in the file name
(``..._64gpu.json``). The paper configs must reproduce VRGD.md §4's step counts.
"""

import json
import re
import types
from pathlib import Path

import pytest
import torch

import deepspeed.runtime.config as ds_config
import vrgd_ds
from vrgd_ds.deepspeed_glue import build_from_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
PAPER = re.compile(
    r"bert_large_vrlamb_(?P<recipe>\d+k\d+k)_phase(?P<phase>[12])_seq(?P<seq>\d+)_(?P<dtype>fp16|bf16)_(?P<gpus>\d+)gpu\.json"
)
# VRGD.md §4: total steps of each two-phase recipe, and its phase batch sizes (k = 1024).
PAPER_STEPS = {"64k32k": 8599, "96k32k": 6256, "128k64k": 4301}


PRETRAIN = [p for p in CONFIGS if PAPER.fullmatch(p.name) or p.name.startswith("tiny_cpu_")]


def documented_world_size(path: Path, config: dict) -> int:
    found = re.findall(r"(\d+) (?:GPUs|ranks)\b", config.get("_comment", ""))
    assert found, (
        f'{path.name}: say in "_comment" how many GPUs or ranks it is written for '
        f'(e.g. "... 2 ranks x micro 8 x gradient accumulation 4 ...")'
    )
    return int(found[0])


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu_phase1.json", "tiny_cpu_phase2.json"} <= names
    recipes = {(m["recipe"], m["phase"], m["dtype"]) for m in map(PAPER.fullmatch, names) if m}
    assert recipes == {(r, p, d) for r in PAPER_STEPS for p in "12" for d in ("fp16", "bf16")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path, monkeypatch):
    """DeepSpeed accepts it on its documented number of ranks; a VR optimizer type builds from it."""
    config = json.loads(path.read_text())
    world = documented_world_size(path, config)
    match = PAPER.fullmatch(path.name)
    if match:
        assert int(match["gpus"]) == world

    tbs = config["train_batch_size"]
    micro = config["train_micro_batch_size_per_gpu"]
    gas = config["gradient_accumulation_steps"]
    assert micro * gas * world == tbs, f"{micro} x {gas} x {world} != {tbs}"
    assert "gradient_clipping" in config, "say gradient_clipping explicitly (DeepSpeed's default is 1.0)"

    # DeepSpeed's own parsing and checks, as on `world` ranks (no process group needed).
    fake_dist = types.SimpleNamespace(get_rank=lambda *a, **k: 0, get_world_size=lambda *a, **k: world)
    monkeypatch.setattr(ds_config, "dist", fake_dist)
    parsed = ds_config.DeepSpeedConfig(config)
    assert parsed.world_size == world
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        tbs,
        micro,
        gas,
    )
    assert parsed.gradient_clipping == config["gradient_clipping"]

    # Our optimizer types, built the way DeepSpeed builds them from a config (unknown keys fail).
    optimizer = config["optimizer"]
    cls = vrgd_ds.OPTIMIZERS.get(optimizer["type"].lower())
    if cls is not None:
        build_from_config(cls, optimizer["params"], torch.nn.Linear(4, 2).parameters())
        assert world * gas >= 2, "VRGD needs k = world size x accumulation >= 2 gradient samples per step"


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_config(path):
    """pretrain_bert.py's configs: VR-LAMB, ZeRO-2, one precision, linear warm-up then decay."""
    config = json.loads(path.read_text())
    optimizer = config["optimizer"]
    assert optimizer["type"] == "VRLamb"
    assert optimizer["params"]["weight_decay_exclude_1d"], (
        "pretrain_bert.py passes one flat parameter list: exclude 1-D params (biases, LayerNorm) from decay"
    )
    assert optimizer["params"]["stats_interval"] > 0, "the progress bar and plots show GSNR statistics"
    assert config["zero_optimization"]["stage"] == 2
    assert not (config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"))
    sched = config["scheduler"]
    assert sched["type"] == "WarmupDecayLR"
    params = sched["params"]
    assert params["warmup_type"] == "linear"  # DeepSpeed's default is "log"
    assert 0 < params["warmup_num_steps"] < params["total_num_steps"]
    assert params["warmup_max_lr"] == optimizer["params"]["lr"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if PAPER.fullmatch(p.name)], ids=lambda p: p.name)
def test_paper_config_lamb_is_apex_fused_lamb(path):
    """NVIDIA's recipe runs apex FusedLAMB with its defaults: trust ratio only where weight_decay
    != 0 (use_nvlamb false; the 1-D tensors get none), global-norm clipping at max_grad_norm 1.0
    (here DeepSpeed's gradient_clipping; VRGD.md section 3, tests/test_lamb_parity.py)."""
    config = json.loads(path.read_text())
    params = config["optimizer"]["params"]
    assert params["use_nvlamb"] is False and params["weight_decay"] > 0 and params["weight_decay_exclude_1d"]
    assert config["gradient_clipping"] == 1.0
    opt = build_from_config(vrgd_ds.OPTIMIZERS["vrlamb"], params, torch.nn.Linear(4, 2).parameters())
    decay, no_decay = opt.param_groups
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (params["weight_decay"], 0.0)
    assert decay["use_nvlamb"] is no_decay["use_nvlamb"] is False


@pytest.mark.parametrize("recipe", sorted(PAPER_STEPS))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_paper_recipe(recipe, dtype):
    """Phase 1 (seq 128) + phase 2 (seq 512) steps add up to the paper's table; batches match the name."""
    batch1, batch2 = (int(b) * 1024 for b in re.findall(r"\d+", recipe))
    phases = {}
    for path in CONFIGS:
        match = PAPER.fullmatch(path.name)
        if match and match["recipe"] == recipe and match["dtype"] == dtype:
            phases[int(match["phase"])] = (int(match["seq"]), json.loads(path.read_text()))
    (seq1, c1), (seq2, c2) = phases[1], phases[2]
    assert (seq1, seq2) == (128, 512)
    assert (c1["train_batch_size"], c2["train_batch_size"]) == (batch1, batch2)
    steps1, steps2 = (c["scheduler"]["params"]["total_num_steps"] for c in (c1, c2))
    assert steps1 + steps2 == PAPER_STEPS[recipe]
    # ~90% of the samples in phase 1, as in NVIDIA's and the paper's recipes.
    samples1, samples2 = steps1 * batch1, steps2 * batch2
    assert 0.89 < samples1 / (samples1 + samples2) < 0.91
    assert c1.get(dtype, {}).get("enabled") and c2.get(dtype, {}).get("enabled")
