"""pretrain_bert.py end to end on 2 CPU ranks (tiny BERT, VR-LAMB, ZeRO-2), its command-line checks
(pretraining.args) and the pure parts of its model and metrics modules; the data pipeline's own
tests are in tests/test_pretraining_data.py.

Multi-rank runs are real launches (``torchrun`` in a subprocess, its own process group, killed
on timeout). One two-phase run is shared by several tests; the resume and multi-node runs must
reproduce it exactly. Corpus: tests/data/shakespeare_small (public domain, no network).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pretrain_bert.py"
DATA = REPO / "tests" / "data" / "shakespeare_small"
CONFIGS = REPO / "configs"
PHASE1_STEPS, PHASE2_STEPS = 8, 4
TIMEOUT = 240  # seconds per launch; a healthy one takes ~25 s on 2 cores

sys.path.insert(0, str(REPO))
import pretraining.data  # noqa: E402
from pretraining import InputError  # noqa: E402
from pretraining.args import check_inputs, parse_args  # noqa: E402
from pretraining.checkpoints import checkpoint_tag  # noqa: E402
from pretraining.data import data_files  # noqa: E402
from pretraining.metrics import critical_batch_metrics, layer_of, noise_metrics, open_noise_csv  # noqa: E402
from pretraining.model import warmup_decay  # noqa: E402


def run_args(out: Path, cache: Path, *extra) -> list[str]:
    return [
        "--model",
        "tiny",
        "--data",
        str(DATA),
        "--vocab-size",
        "1000",
        "--cache-dir",
        str(cache),
        "--output-dir",
        str(out),
        "--phase1-config",
        str(CONFIGS / "tiny_cpu_phase1.json"),
        "--phase1-steps",
        str(PHASE1_STEPS),
        "--phase2-config",
        str(CONFIGS / "tiny_cpu_phase2.json"),
        "--phase2-steps",
        str(PHASE2_STEPS),
        "--log-interval",
        "1",
        "--eval-interval",
        "4",
        "--eval-samples",
        "32",
        *extra,
    ]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[list[str]], timeout: float = TIMEOUT, expect_ok: bool = True):
    """Run the commands concurrently (each in its own process group); return their (rc, output).

    Output goes to files, not pipes: a pipe nobody reads while we wait on another command could
    fill up and stall its rank, and with it the whole process group.
    """
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = [
        subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO, start_new_session=True
        )
        for cmd, log in zip(commands, logs)
    ]
    # Poll them all: when one fails, the others (e.g. the other node's agent) would wait for it
    # until their rendezvous times out; stop them at once instead.
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        if expect_ok and any(proc.poll() not in (None, 0) for proc in procs):
            break
        time.sleep(0.2)
    timed_out = any(proc.poll() is None for proc in procs) and time.monotonic() >= deadline
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out:
        pytest.fail(f"timed out after {timeout}s (a hang?): {commands}\n" + "\n".join(o[-3000:] for o in outputs))
    for proc, out, cmd in zip(procs, outputs, commands):
        if expect_ok and proc.returncode != 0:
            pytest.fail(f"exit code {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def torchrun(args: list[str], nproc: int = 2, **kw) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(SCRIPT),
        *args,
    ]
    return launch([cmd], **kw)[0]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return series


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == checkpoint_tag(2, PHASE2_STEPS)
    return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def assert_same_run(reference: Path, other: Path):
    """Same final weights (bit for bit) and the same metrics, wall-clock throughput aside."""
    ref, new = final_weights(reference), final_weights(other)
    assert ref.keys() == new.keys()
    for name in ref:
        assert torch.equal(ref[name], new[name]), name
    a, b = read_metrics(reference / "metrics.csv"), read_metrics(other / "metrics.csv")
    timing = {"train/samples_per_s", "train/tokens_per_s"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache):
    """Both phases, 2 ranks, from scratch: trains the tokenizer and builds the token cache."""
    out = tmp_path_factory.mktemp("reference")
    rc, output = torchrun(run_args(out, cache))
    return out, output


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def test_two_phases_train(reference_run):
    out, output = reference_run
    assert "tokenizer: trained" in output
    metrics = read_metrics(out / "metrics.csv")
    losses = [v for _, v in metrics["train/loss"]]
    assert len(losses) == PHASE1_STEPS + PHASE2_STEPS
    assert all(math.isfinite(v) for v in losses)
    # Falls in each phase (the first two steps of a phase run at LR 0: DeepSpeed's linear warm-up).
    phase1, phase2 = losses[:PHASE1_STEPS], losses[PHASE1_STEPS:]
    assert phase1[-1] < phase1[0] - 0.05, phase1
    assert phase2[-1] < phase2[0], phase2

    # Held-out evaluation: at the start, every 4 steps and at each phase end; the loss falls.
    eval_loss = dict(metrics["eval/loss"])
    assert sorted(eval_loss) == [0, 4, 8, 12]
    assert eval_loss[8] < eval_loss[0] - 0.05 and eval_loss[12] < eval_loss[0] - 0.05
    assert all(0 <= v <= 1 for _, v in metrics["eval/accuracy"])
    assert sorted(dict(metrics["eval/mask_accuracy"])) == [0, 4, 8, 12]
    assert {s for s, _ in metrics["train/lr"]} == set(range(1, 13))
    # The unigram baseline (always the most frequent token), once at the start of each phase.
    assert [s for s, _ in metrics["eval/unigram_accuracy"]] == [0, PHASE1_STEPS]
    assert all(0.01 < v < 0.2 for _, v in metrics["eval/unigram_accuracy"])
    assert "(the unigram baseline)" in output

    # VR-LAMB's GSNR statistics, overall and per layer.
    assert len(metrics["gsnr/gsnr_mean"]) == PHASE1_STEPS + PHASE2_STEPS
    for layer in ("embeddings", "encoder.layer.0", "encoder.layer.1"):
        assert all(0 <= v <= 1 for _, v in metrics[f"gsnr_layer/{layer}/clip_frac"])

    # Gradient-noise statistics (noise_stats()): global values every log interval (1 here), each
    # phase's critical-batch summary line, and each tensor's values in one long-format CSV.
    assert {s for s, _ in metrics["noise/b_simple_ema"]} == set(range(1, 13))
    assert all(v == 4 for _, v in metrics["noise/k"])  # 2 ranks x 2 micro-batches
    assert all(v > 0 for _, v in metrics["noise/noise_trace"])
    assert "noise/b_simple" in metrics and "noise/grad_norm_sq" in metrics
    for number, batch in ((1, 64), (2, 32)):
        assert re.search(rf"phase {number}: batch B = {batch}, critical batch (≈|not estimated)", output), output[
            -3000:
        ]
    ends = {s for s, _ in metrics.get("noise/examples_vs_critical", [])}
    assert ends <= {PHASE1_STEPS, PHASE1_STEPS + PHASE2_STEPS}
    with open(out / "noise_per_tensor.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "tensor", "name", "value"]
    assert {int(r[0]) for r in rows[1:]} == set(range(1, 13))
    tensors = {r[1] for r in rows[1:]}
    assert "*" in tensors and any("encoder.layer.0" in t for t in tensors) and len(tensors) > 10
    assert {"grad_norm_sq", "noise_trace", "b_simple"} <= {r[2] for r in rows[1:] if r[1] != "*"}

    # Checkpoints of both phases, the final model, the plot.
    assert (out / "checkpoints" / "phase1-step000008").is_dir()
    assert (out / "checkpoints" / "phase2-step000004").is_dir()
    assert (out / "final_model" / "config.json").is_file() and (out / "final_model" / "spm.model").is_file()
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_resume_continues_exactly_and_reuses_cache(reference_run, cache, tmp_path):
    """Stop after step 5 of 8, resume: same weights and metrics as the uninterrupted run."""
    reference, _ = reference_run
    (tokenizer,) = (cache / "tokenizers").glob("*.model")
    sequences = sorted((cache / "sequences").iterdir())
    stamps = [p.stat().st_mtime_ns for p in [tokenizer, *sequences]]

    out = tmp_path / "resumed"
    rc, first = torchrun(run_args(out, cache, "--stop-at-step", "5", "--no-plot"))
    assert "stopped after global step 5" in first
    assert (out / "checkpoints" / "latest").read_text().strip() == "phase1-step000005"
    # The second run reuses the sentencepiece model and the tokenized sequences.
    assert "tokenizer: reusing" in first and "data: reusing seq 64" in first and "data: reusing seq 128" in first
    assert "tokenizer: trained" not in first
    assert [p.stat().st_mtime_ns for p in [tokenizer, *sequences]] == stamps

    rc, second = torchrun(run_args(out, cache, "--resume", "--no-plot"))
    assert "resumed from checkpoint phase1-step000005" in second
    assert_same_run(reference, out)


def test_two_nodes_equal_one_node(reference_run, cache, tmp_path):
    """2 nodes x 1 rank (two torchrun agents on this machine) == 1 node x 2 ranks, bit for bit."""
    reference, _ = reference_run
    out, port = tmp_path / "two_nodes", _free_port()
    commands = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(SCRIPT),
            *run_args(out, cache, "--no-plot"),
        ]
        for node in (0, 1)
    ]
    launch(commands)
    assert_same_run(reference, out)


def test_corpus_too_small_fails_on_every_rank(tmp_path):
    """Found after tokenization, inside the process group: every rank exits, none hangs.

    Launched with the DeepSpeed launcher (as scripts/run_demo.sh does): it appends --local_rank.
    """
    # 93 lines of 42 characters and a newline: 3999 bytes pass the byte bound checked up front
    # (64 x 62 = 3968 tokens needed), but at most 42 tokens per line are < 3968.
    data = tmp_path / "small"
    for split, text in (
        ("train", "To be, or not to be, that is the question.\n" * 93),
        ("eval", "Words, words, words.\n" * 20),
    ):
        (data / split).mkdir(parents=True)
        (data / split / "doc.txt").write_text(text)
    args = run_args(tmp_path / "out", tmp_path / "cache", "--no-plot")
    args[args.index("--data") + 1] = str(data)
    args[args.index("--vocab-size") + 1] = "100"
    for flag in ("--phase2-config", "--phase2-steps"):  # phase 1 only
        del args[args.index(flag) : args.index(flag) + 2]
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        str(SCRIPT),
        *args,
    ]
    ((rc, output),) = launch([cmd], timeout=120, expect_ok=False)
    assert rc != 0
    assert re.search(r"corpus is too small for one phase-1 batch: \d+ training sequences of 64 tokens", output)


# ----------------------------------------------------------------------------------------------
# Bad input, found before any process group exists
# ----------------------------------------------------------------------------------------------


def check(tmp_path, *extra, **replace):
    args = run_args(tmp_path / "out", tmp_path / "cache", *extra)
    for flag, value in replace.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return check_inputs(parse_args(args))


def test_check_inputs_accepts_the_test_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    phase1, phase2 = check(tmp_path)
    assert (phase1.seq_len, phase1.steps, phase1.train_batch_size, phase1.grad_accum) == (64, PHASE1_STEPS, 64, 2)
    assert (phase2.seq_len, phase2.steps, phase2.train_batch_size) == (128, PHASE2_STEPS, 32)
    # Overriding the step count keeps the config's warm-up share (at least one step).
    sched = json.loads((CONFIGS / "tiny_cpu_phase1.json").read_text())["scheduler"]["params"]
    share = sched["warmup_num_steps"] / sched["total_num_steps"]
    assert phase1.config["scheduler"]["params"]["warmup_num_steps"] == max(1, round(share * PHASE1_STEPS))


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"data": "/nonexistent/corpus"}, "no such file or directory. Run scripts/prepare_corpus.py"),
        ({"phase2_seq_len": 256}, "phase 2 sequence length 256 exceeds max_position_embeddings 128"),
        ({"phase1_config": "/nonexistent.json"}, "no such file"),
        ({"eval_fraction": 1.5}, "must be in (0, 1)"),
    ],
)
def test_bad_input(tmp_path, monkeypatch, replace, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError) as err:
        check(tmp_path, **replace)
    assert message in str(err.value)


def test_batch_arithmetic_and_vr_sample_count(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # the tiny configs are written for 2 ranks
    with pytest.raises(InputError, match="pass --adapt-accumulation"):
        check(tmp_path)
    (phase1, phase2) = check(tmp_path, "--adapt-accumulation")
    assert (phase1.micro_batch_size, phase1.grad_accum) == (16, 1)

    monkeypatch.setenv("WORLD_SIZE", "1")
    config = tmp_path / "k1.json"
    config.write_text(
        '{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,'
        ' "optimizer": {"type": "VRLamb", "params": {}}}'
    )
    with pytest.raises(InputError, match="it needs k >= 2: set gradient_accumulation_steps >= 2"):
        check(tmp_path, phase1_config=config)


def test_corpus_smaller_than_one_batch_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for split in ("train", "eval"):
        (tmp_path / "small" / split).mkdir(parents=True)
        (tmp_path / "small" / split / "doc.txt").write_text("Words, words, words.\n" * 20)
    with pytest.raises(InputError, match="corpus is too small for one phase-1 batch: 420 bytes"):
        check(tmp_path, data=tmp_path / "small")


def test_empty_corpus_and_existing_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "eval").mkdir()
    (tmp_path / "empty" / "train" / "a.txt").write_text("")
    (tmp_path / "empty" / "eval" / "b.txt").write_text("held out")
    with pytest.raises(InputError, match="training documents are empty"):
        check(tmp_path, data=tmp_path / "empty")
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "latest").write_text("phase1-step000004")
    with pytest.raises(InputError, match="pass --resume"):
        check(tmp_path)


def write_corpus(root: Path, train: dict[str, bytes], held_out: dict[str, bytes]) -> Path:
    for split, docs in (("train", train), ("eval", held_out)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, data in docs.items():
            (root / split / name).write_bytes(data)
    return root


PROSE = DATA.joinpath("train", "tempest.txt").read_bytes()  # ~98 KB: more than one batch of text


def test_blank_corpus_is_named_before_the_tokenizer(tmp_path, monkeypatch):
    """Only blank lines (once: a sentencepiece INTERNAL "!sentences_.empty()" traceback)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    blank = b"\n  \n\t\r\n" * 2000  # 14 KB: passes the byte bound of one batch
    data = write_corpus(tmp_path / "blank", {"a.txt": blank, "b.txt": b"\n" * 5000}, {"c.txt": PROSE})
    with pytest.raises(
        InputError,
        match=r"the 2 training document\(s\) hold only blank lines "
        r"\(\S+/train/a.txt \S+/train/b.txt\): nothing to train",
    ) as err:
        check(tmp_path, data=data)
    assert "\n" not in str(err.value)
    # A blank file among others is fine; blank held-out documents are named too.
    write_corpus(data, {"a.txt": PROSE}, {"c.txt": b" \n\n"})
    with pytest.raises(InputError, match=r"the 1 held-out document\(s\) hold only blank lines \(\S+/eval/c.txt\)"):
        check(tmp_path, data=data)


def test_file_not_utf8_is_named(tmp_path, monkeypatch):
    """Latin-1 text (once: a `datasets` DatasetGenerationError that named no file)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = write_corpus(
        tmp_path / "latin", {"a.txt": PROSE, "b.txt": PROSE + "Caf\u00e9 noir\n".encode("latin-1")}, {"c.txt": PROSE}
    )
    with pytest.raises(InputError) as err:
        check(tmp_path, data=data)
    line = PROSE.count(b"\n") + 1
    assert str(err.value).startswith(
        f"{data / 'train' / 'b.txt'}: not UTF-8 text (byte 0xe9 at line {line}, "
        f"byte offset {len(PROSE) + 3}): convert it to UTF-8"
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, r"--data \S+: no .txt documents \(\S+ holds no files\)"),
        (
            {"notes.md": b"x", "data.csv": b"x"},
            r"holds no .txt files \(2 other file\(s\): data.csv, notes.md\); documents "
            r"must be plain-text files whose names end in .txt",
        ),
        (
            {"train/x.txt/": b"", "eval/c.txt": b"held out"},
            r"\S+/train holds no files. Put the training documents there",
        ),
        (
            {"train/a.txt": b"text", "eval/notes.md": b"x"},
            r"\S+/eval holds no .txt files: put held-out documents there",
        ),
    ],
)
def test_corpus_without_documents(tmp_path, monkeypatch, layout, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in layout.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            (corpus / name).mkdir()  # a directory named like a document
        else:
            (corpus / name).write_bytes(data)
    with pytest.raises(InputError, match=message):
        check(tmp_path, data=corpus)


def test_documents_are_read_once_per_corpus(tmp_path, monkeypatch):
    """A corpus already tokenized into the cache (same paths, sizes, times) is not read again."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    read = []
    monkeypatch.setattr(pretraining.data, "check_text", lambda path: read.append(path) or True)
    check(tmp_path)
    assert len(read) == 3
    args = parse_args(run_args(tmp_path / "out", tmp_path / "cache"))
    check_inputs(args)
    for path in data_files(args, [64, 128]).sequences.values():
        path.mkdir(parents=True)
        (path / "dataset_dict.json").write_text("{}")
    check(tmp_path)
    assert len(read) == 6


def test_bad_tokenizer_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "x.model").write_text("not a model")
    with pytest.raises(InputError, match="x.model: not a sentencepiece model"):
        check(tmp_path, tokenizer=tmp_path / "x.model")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="list.json: a DeepSpeed config is a JSON object"):
        check(tmp_path, phase1_config=tmp_path / "list.json")


@pytest.mark.parametrize("case", ["not_utf8", "blank"])
def test_bad_corpus_ends_in_one_line(tmp_path, case):
    """The script itself (1 rank): exit code 2 and one error line naming the file, no traceback."""
    bad = PROSE + b"\xe9\n" if case == "not_utf8" else b"\n" * 5000
    data = write_corpus(
        tmp_path / "corpus", {"a.txt": PROSE, "b.txt": bad} if case == "not_utf8" else {"b.txt": bad}, {"c.txt": PROSE}
    )
    args = run_args(tmp_path / "out", tmp_path / "cache", "--adapt-accumulation")
    args[args.index("--data") + 1] = str(data)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=TIMEOUT
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = "not UTF-8 text" if case == "not_utf8" else "hold only blank lines"
    assert len(errors) == 1 and str(data / "train" / "b.txt") in errors[0] and expected in errors[0], proc.stderr
    assert not (tmp_path / "cache").exists()  # found before the tokenizer or `datasets` ran


# ----------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------


def test_warmup_decay():
    f = lambda s, **k: warmup_decay(s, total=100, warmup=10, **k)  # noqa: E731
    assert f(0, decay="poly", power=1.0) == 0.0
    assert f(5, decay="poly", power=1.0) == 0.5
    assert f(10, decay="poly", power=1.0) == 1.0
    assert f(55, decay="poly", power=1.0) == pytest.approx(0.5)
    assert f(55, decay="poly", power=0.5) == pytest.approx(0.5**0.5)
    assert f(55, decay="cosine", power=1.0) == pytest.approx(0.5)
    assert f(100, decay="cosine", power=1.0) == pytest.approx(0.0)


def test_layer_of():
    assert layer_of("bert.encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert layer_of("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert layer_of("cls.predictions.transform.dense.weight") == "mlm_head"


@pytest.mark.parametrize("with_noise", [True, False])
def test_plot_metrics_with_and_without_noise_rows(tmp_path, with_noise):
    """The B_simple panel: drawn from noise/* rows; an older metrics.csv without them still plots."""
    sys.path.insert(0, str(REPO / "scripts"))
    from plot_metrics import plot_metrics

    rows = [("step", "phase", "name", "value"), (0, 1, "eval/loss", 7.0), (0, 1, "eval/accuracy", 0.05)]
    for step in range(1, 13):
        phase, batch = (1, 64) if step <= 8 else (2, 32)
        rows += [
            (step, phase, "train/loss", 7.0 - 0.1 * step),
            (step, phase, "train/batch_size", batch),
            (step, phase, "gsnr_layer/embeddings/gsnr_mean", 0.1),
            (step, phase, "gsnr_layer/embeddings/clip_frac", 0.5),
        ]
        if with_noise:
            rows += [
                (step, phase, "noise/b_simple", 30.0 * (1 + (step % 3))),
                (step, phase, "noise/b_simple_ema", 50.0 + step),
                (step, phase, "noise/grad_norm_sq", 0.1),
                (step, phase, "noise/noise_trace", 5.0),
            ]
    if with_noise:
        rows.append((5, 1, "noise/b_simple", -3.0))  # an unbiased per-step estimate can be negative: skipped
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    png = plot_metrics(path)
    assert png == tmp_path / "metrics.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_noise_metrics_and_critical_batch():
    stats = {
        "k": 4,
        "micro_batch_size": 16,
        "grad_norm_sq": torch.tensor(0.5),
        "noise_trace": 10.0,
        "b_simple": float("nan"),
        "b_simple_ema": 20.0,
        "gsnr_unbiased_mean": None,
        "per_tensor": {},
    }
    assert noise_metrics(stats) == {
        "noise/k": 4.0,
        "noise/grad_norm_sq": 0.5,
        "noise/noise_trace": 10.0,
        "noise/b_simple_ema": 20.0,
    }
    assert noise_metrics({}) == {}
    m = critical_batch_metrics(60, 20.0)
    assert m["noise/examples_vs_critical"] == pytest.approx(2.0) and m["noise/steps_vs_critical"] == pytest.approx(
        2 / 3
    )
    assert critical_batch_metrics(60, -1.0) == {} and critical_batch_metrics(60, None) == {}


def test_noise_csv_restarts_or_keeps_rows_up_to_the_resume_step(tmp_path):
    path = tmp_path / "noise_per_tensor.csv"
    with open_noise_csv(path, None) as w:
        for step in (1, 2, 3):
            w.write(step, [("*", "b_simple", 10.0 * step)])
    with open_noise_csv(path, 2) as w:  # resumed from step 2: step 3 is written again
        w.write(3, [("*", "b_simple", 31.0)])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [
            ["step", "tensor", "name", "value"],
            ["1", "*", "b_simple", "10.0"],
            ["2", "*", "b_simple", "20.0"],
            ["3", "*", "b_simple", "31.0"],
        ]
    open_noise_csv(path, None).close()  # a fresh run starts over
    assert not path.exists()
