"""Megatron-DeepSpeed with vrgd_ds on CPU ranks: the Python half of scripts/megatron_check.sh.

Subcommands (the shell script calls them in this order):

    prepare --out DIR                  tiny corpus (tests/data/shakespeare_small/train) as JSON lines,
                                       and a byte-level BPE vocabulary trained on it (vocab.json,
                                       merges.txt: GPT2BPETokenizer's files, no hub download)
    run NAME --megatron DIR --data DIR --out DIR [--iters N]
                                       one configuration of CONFIGS on its ranks (torchrun); rank 0
                                       writes OUT/NAME/metrics.jsonl, one JSON line per iteration
    train --metrics FILE -- ARGS...    a rank's entry (torchrun starts it): pretrain_gpt.py's main with
                                       ARGS, logging loss, noise_stats() and GSNR statistics per step
    summary OUT                        a table of what OUT holds

Which optimizer Megatron builds is chosen by the patch scripts/megatron_patches/0002-*.patch:
MEGATRON_VRGD_OPTIMIZER=VRLamb and MEGATRON_VRGD_PARAMS='{"vr": ...}' (set here per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_TEXTS = REPO / "tests" / "data" / "shakespeare_small" / "train"

# The tiny GPT: 2 layers, hidden 64, 4 heads, sequence 64; 8 sequences per step, micro-batch 2, so
# k = 4 gradient samples per step in every layout (DP1: 4 micro-steps, DP2: 2 per rank).
MICRO_BATCH, GLOBAL_BATCH = 2, 8
GRADIENT_CLIPPING = 1.0
VOCAB_SIZE = 512


@dataclass(frozen=True)
class Config:
    tp: int
    dp: int
    zero: int
    dtype: str  # "fp32" or "bf16"
    vr: bool
    grad_accum_fp32: bool = False  # bf16 + ZeRO-1: "data_types": {"grad_accum_dtype": "fp32"}

    @property
    def world(self) -> int:
        return self.tp * self.dp


CONFIGS = {
    "tp1dp1_z1_fp32_vr": Config(1, 1, 1, "fp32", True),
    "tp1dp2_z1_fp32_vr": Config(1, 2, 1, "fp32", True),
    "tp2dp1_z1_fp32_vr": Config(2, 1, 1, "fp32", True),
    "tp2dp2_z1_fp32_vr": Config(2, 2, 1, "fp32", True),
    "tp1dp2_z2_fp32_vr": Config(1, 2, 2, "fp32", True),
    "tp1dp2_z3_fp32_vr": Config(1, 2, 3, "fp32", True),
    "tp1dp2_z1_fp32_novr": Config(1, 2, 1, "fp32", False),
    "tp1dp2_z3_fp32_novr": Config(1, 2, 3, "fp32", False),
    "tp1dp2_z1_bf16_vr": Config(1, 2, 1, "bf16", True),
    "tp1dp2_z1_bf16acc32_vr": Config(1, 2, 1, "bf16", True, grad_accum_fp32=True),
    "tp1dp2_z2_bf16_vr": Config(1, 2, 2, "bf16", True),
    "tp1dp2_z3_bf16_vr": Config(1, 2, 3, "bf16", True),
}


# ---- data ---------------------------------------------------------------------------------------
def prepare(out: Path, lines_per_doc: int = 40) -> None:
    """corpus.jsonl ({"text": ...} per document of ``lines_per_doc`` non-empty lines) and a
    byte-level BPE vocabulary (tokenizers' ByteLevelBPETokenizer, the GPT-2 file format)."""
    from tokenizers import ByteLevelBPETokenizer

    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for path in sorted(CORPUS_TEXTS.glob("*.txt")):
        lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        docs += ["\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(docs, vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.save_model(str(out))
    print(f"prepare: {len(docs)} documents, vocabulary {tokenizer.get_vocab_size()} -> {out}")


# ---- one configuration --------------------------------------------------------------------------
def ds_config(cfg: Config, monitor_dir: Path | None = None) -> dict:
    conf = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        # Megatron's --clip-grad reaches only its own (non-DeepSpeed) optimizer wrappers.
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": {"stage": cfg.zero},
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }
    if monitor_dir is not None:  # vrgd_ds.monitor.log_noise_stats writes there
        conf["csv_monitor"] = {"enabled": True, "output_path": str(monitor_dir), "job_name": "monitor"}
    if cfg.dtype == "bf16":
        conf["bf16"] = {"enabled": True}
        if cfg.grad_accum_fp32:
            conf["data_types"] = {"grad_accum_dtype": "fp32"}
    return conf


def megatron_args(cfg: Config, data: Path, iters: int, ds_config_path: Path) -> list[str]:
    args = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(GLOBAL_BATCH),
        "--train-iters", str(iters), "--lr", "2e-3", "--lr-decay-style", "constant",
        "--weight-decay", "0.01", "--clip-grad", str(GRADIENT_CLIPPING),
        "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-eps", "1e-6",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "1234",
        "--data-path", str(data / "corpus_text_document"), "--split", "100,0,0",
        "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", str(data / "vocab.json"), "--merge-file", str(data / "merges.txt"),
        "--make-vocab-size-divisible-by", "128",
        "--eval-iters", "0", "--eval-interval", str(10**6), "--log-interval", "1", "--num-workers", "0",
        "--tensor-model-parallel-size", str(cfg.tp), "--pipeline-model-parallel-size", "1",
        "--no-pipeline-parallel", "--deepspeed", "--deepspeed_config", str(ds_config_path),
        "--zero-stage", str(cfg.zero),
        "--use-cpu-initialization", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
        "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion",
        "--no-async-tensor-model-parallel-allreduce",
    ]  # fmt: skip
    if cfg.dtype == "bf16":
        args.append("--bf16")
    return args


def vrgd_params(cfg: Config) -> dict:
    # vr: false keeps the base update exactly; gradient_stats: true still gives noise_stats().
    params = {"vr": cfg.vr, "gamma": 0.1, "stats_interval": 1}
    if not cfg.vr:
        params["gradient_stats"] = True
    return params


def run(name: str, megatron: Path, data: Path, out: Path, iters: int, port: int) -> int:
    cfg = CONFIGS[name]
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    ds_path = run_dir / "ds_config.json"
    ds_path.write_text(json.dumps(ds_config(cfg, run_dir), indent=1))
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        # DeepSpeed's CPU accelerator counts LOCAL_SIZE devices (else NUMA nodes: 1), and Megatron
        # wants local_rank == rank % device_count; the deepspeed launcher sets it the same way.
        LOCAL_SIZE=str(cfg.world),
        MEGATRON_VRGD_OPTIMIZER="VRLamb",
        MEGATRON_VRGD_PARAMS=json.dumps(vrgd_params(cfg)),
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        PYTHONPATH=os.pathsep.join([str(megatron), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(cfg.world),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(Path(__file__).resolve()), "train", "--megatron", str(megatron), "--metrics", str(metrics), "--",
        *megatron_args(cfg, data, iters, ds_path),
    ]  # fmt: skip
    start = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.call(cmd, cwd=megatron, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    (run_dir / "run.json").write_text(json.dumps({"name": name, "rc": rc, "wall_s": wall, **cfg.__dict__}))
    print(f"run {name}: rc={rc}, {wall:.0f} s", flush=True)
    return rc


# ---- a rank ---------------------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj


def train(megatron_dir: Path, metrics: Path, argv: list[str]) -> None:
    """pretrain_gpt.py's __main__ with a wrapper around megatron.training.train_step that writes,
    on rank 0, the iteration's loss and the optimizer's statistics as one JSON line (and one around
    get_megatron_optimizer that records its parameter groups)."""
    sys.path.insert(0, str(megatron_dir))
    # DeepSpeed checks args.local_rank against $LOCAL_RANK (the deepspeed launcher passes it).
    sys.argv = [str(megatron_dir / "pretrain_gpt.py"), *argv, "--local_rank", os.environ.get("LOCAL_RANK", "0")]
    from vrgd_ds.cpu_comm import avoid_shm_allreduce

    avoid_shm_allreduce()  # no /dev/shm buffers, no JIT build of DeepSpeed's shm op
    import megatron.training as training  # the Megatron-DeepSpeed checkout
    import pretrain_gpt
    import torch.distributed as dist
    from megatron.core.enums import ModelType

    import vrgd_ds
    import vrgd_ds.monitor  # not imported by `import vrgd_ds`

    step_fn, build_optimizer = training.train_step, training.get_megatron_optimizer
    state = {"iteration": 0, "groups": None}

    def recorded_get_megatron_optimizer(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        # Megatron's decay / no-decay split, sized by the full shapes (ZeRO-3: ds_numel).
        state["groups"] = [
            {
                "name": group.get("name"),
                "wd_mult": group.get("wd_mult"),
                "tensors": len(group["params"]),
                "numel": sum(getattr(p, "ds_numel", p.numel()) for p in group["params"]),
            }
            for group in optimizer.param_groups
        ]
        return optimizer

    def logged_train_step(forward_step_func, data_iterator, model, *rest):
        start = time.time()
        out = step_fn(forward_step_func, data_iterator, model, *rest)
        elapsed = time.time() - start
        state["iteration"] += 1
        # to DeepSpeed's monitor (the config's csv_monitor; written on rank 0)
        vrgd_ds.monitor.log_noise_stats(model[0])
        if dist.get_rank() != 0:
            return out
        engine = model[0]
        opt = vrgd_ds.find_vr_optimizer(engine)
        record = {
            "iteration": state["iteration"],
            "loss": {k: float(v) for k, v in out[0].items()},
            "step_s": elapsed,
            "skipped": int(out[1]),
            "wrapper": type(engine.optimizer).__name__,
            "optimizer": type(opt).__name__ if opt is not None else None,
            "groups": state["groups"],
            "noise": _jsonable(opt.noise_stats()) if opt is not None else None,
            "gsnr_summary": _jsonable(opt.gsnr_summary()) if opt is not None else None,
            "gsnr": _jsonable(opt.gsnr_stats()) if opt is not None else None,
        }
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        return out

    training.train_step = logged_train_step
    training.get_megatron_optimizer = recorded_get_megatron_optimizer
    training.pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        pretrain_gpt.model_provider,
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        data_post_process=pretrain_gpt.data_post_process,
    )
    dist.barrier()
    dist.destroy_process_group()


# ---- reading results ---------------------------------------------------------------------------
def load_metrics(out: Path, name: str) -> list[dict]:
    path = out / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lm_losses(records: list[dict]) -> list[float]:
    return [r["loss"]["lm loss"] for r in records]


def summary(out: Path) -> str:
    rows = ["| run | rc | wall s | wrapper | loss first → last | iters | gsnr_mean step 1 | clip_frac step 1 |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        info_path = out / name / "run.json"
        if not info_path.exists():
            continue
        info = json.loads(info_path.read_text())
        recs = load_metrics(out, name)
        losses = lm_losses(recs)
        first = recs[0]["gsnr_summary"] if recs and recs[0]["gsnr_summary"] else {}
        loss_txt = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "–"
        rows.append(
            f"| {name} | {info['rc']} | {info['wall_s']:.0f} | {recs[0]['wrapper'] if recs else '–'} | {loss_txt} "
            f"| {len(losses)} | {first.get('gsnr_mean', float('nan')):.4g} "
            f"| {first.get('gsnr_clip_frac', float('nan')):.4g} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("run")
    p.add_argument("name", choices=sorted(CONFIGS))
    p.add_argument("--megatron", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--port", type=int, default=29517)
    p = sub.add_parser("train")
    p.add_argument("--megatron", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("megatron_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    p = sub.add_parser("names")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "run":
        megatron, data, out = args.megatron.resolve(), args.data.resolve(), args.out.resolve()
        sys.exit(run(args.name, megatron, data, out, args.iters, args.port))
    elif args.cmd == "train":
        rest = args.megatron_args[1:] if args.megatron_args[:1] == ["--"] else args.megatron_args
        train(args.megatron, args.metrics, rest)
    elif args.cmd == "summary":
        print(summary(args.out))
    elif args.cmd == "names":
        print(" ".join(CONFIGS))


if __name__ == "__main__":
    main()
