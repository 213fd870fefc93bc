"""Data for BERT pretraining: documents -> sentencepiece -> fixed-length sequences cached on disk
-> BERT-masked micro-batches.

- Documents: ``.txt`` files (a ``train/`` and ``eval/`` directory, or whole documents held out by a
  hash of their name), each checked to be readable UTF-8 text before anything reads it
  (:func:`find_documents`, :func:`check_documents`); or a `datasets` name.
- Tokenizer: a unigram sentencepiece model trained on the training documents, the special
  tokens at ids 0-4 (:data:`SPECIAL_PIECES`) (:func:`train_sentencepiece`).
- Sequences: the token ids concatenated and cut into ``[CLS] + (seq_len - 2) tokens + [SEP]``
  (:func:`pack_sequences`), saved with ``save_to_disk`` under a key of the corpus, the tokenizer
  and the length, so a second run (or a second length) reuses them (:func:`data_files`,
  :func:`prepare_data`).
- Batches: :class:`TrainBatches` and :func:`eval_masks` are pure functions of (seed, phase, step,
  micro-batch) and (seed, sequence index): a resumed run and any launch layout see the same data.

The functions that take ``args`` read these attributes of it: ``data`` (list of paths, or None),
``train_files`` and ``eval_files`` (from :func:`find_documents`), ``dataset``, ``dataset_config``,
``text_column``, ``eval_fraction``, ``seed``, ``tokenizer`` (a path or None), ``vocab_size``,
``cache_dir`` and ``preprocess_workers`` -- ``pretrain_bert.py``'s command line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import sentencepiece as spm
import torch
from datasets import Features, Sequence, Value

from pretraining import InputError
from pretraining.distributed import log

# Special tokens: the sentencepiece model trained here puts them at ids 0-4, in this order.
SPECIAL_PIECES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_PIECES))
MLM_PROBABILITY = 0.15


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts: the same parts give the same seed on every rank and every run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(*parts):
    return torch.Generator().manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------


def _txt_files(directory: Path) -> list[Path]:
    """The .txt files under ``directory`` (recursively); directories named *.txt and broken links are not files."""
    return sorted(f for f in directory.rglob("*.txt") if f.is_file())


def _no_txt_files(directory: Path) -> str:
    """Why ``directory`` gave no documents, naming a few of the files it does hold."""
    others = sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())
    if not others:
        return f"{directory} holds no files"
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return (
        f"{directory} holds no .txt files ({len(others)} other file(s): {shown}); documents must be "
        f"plain-text files whose names end in .txt"
    )


def find_documents(paths: list[Path], eval_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, eval) .txt documents: train/ and eval/ of a single directory, else a split by whole document."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(
            f"--data {' '.join(missing)}: no such file or directory. Run scripts/prepare_corpus.py "
            f"for the Shakespeare corpus, or pass your own .txt files or a directory of them."
        )
    if len(paths) == 1 and (paths[0] / "train").is_dir():
        train = _txt_files(paths[0] / "train")
        if not train:
            raise InputError(
                f"--data {paths[0]}: {_no_txt_files(paths[0] / 'train')}. Put the training documents there."
            )
        evals = _txt_files(paths[0] / "eval") if (paths[0] / "eval").is_dir() else []
        if not evals:
            raise InputError(
                f"{paths[0] / 'eval'} holds no .txt files: put held-out documents there, or pass the "
                f"documents without a train/ directory to hold out --eval-fraction of them."
            )
    else:
        docs = sorted({f.resolve() for p in paths for f in ([p] if p.is_file() else _txt_files(p))})
        if not docs:
            why = "; ".join(_no_txt_files(p) for p in paths if p.is_dir())
            raise InputError(f"--data {' '.join(map(str, paths))}: no .txt documents ({why}).")
        if len(docs) < 2:
            raise InputError(
                f"--data {' '.join(map(str, paths))}: found {len(docs)} .txt document(s); need at least 2 "
                f"to hold whole documents out for evaluation (or a train/ and eval/ directory)."
            )
        # Hold out documents chosen by a hash of their name: deterministic, not biased to A or Z.
        docs.sort(key=lambda f: hashlib.sha1(f.name.encode()).hexdigest())
        n_eval = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
        evals, train = sorted(docs[:n_eval]), sorted(docs[n_eval:])
    if sum(f.stat().st_size for f in train) == 0:
        raise InputError(f"--data {' '.join(map(str, paths))}: the training documents are empty.")
    return train, evals


def check_text(path: Path, chunk_size: int = 1 << 20) -> bool:
    """Whether ``path`` holds a non-blank line; an InputError naming the file and the fix if it is not
    UTF-8 text (what the tokenizer and `datasets` read) or cannot be read. Streams: any file size."""
    offset, line, carry, has_text = 0, 1, b"", False  # offset and line of carry's first byte
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_size)
                data = carry + chunk
                if not data:
                    return has_text
                try:
                    text = data.decode("utf-8")
                    carry = b""
                except UnicodeDecodeError as err:
                    if chunk and err.reason == "unexpected end of data":  # a character cut by the chunk end
                        text, carry = data[: err.start].decode("utf-8"), data[err.start :]
                    else:
                        at_line = line + data.count(b"\n", 0, err.start)
                        raise InputError(
                            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {at_line}, byte offset "
                            f"{offset + err.start}): convert it to UTF-8 (from Latin-1: "
                            f"iconv -f latin1 -t utf-8 IN > OUT) or remove it from --data."
                        ) from None
                has_text = has_text or not text.isspace() and text != ""
                consumed = len(data) - len(carry)
                offset, line = offset + consumed, line + data.count(b"\n", 0, consumed)
                if not chunk:
                    return has_text
    except OSError as err:
        raise InputError(
            f"{path}: cannot read it ({err.strerror or err}). Fix its permissions or remove it from --data."
        ) from None


def check_documents(train: list[Path], evals: list[Path]) -> None:
    """Every document is readable UTF-8 text, and each split holds some non-blank text: found here with
    the file's name, instead of in the tokenizer or `datasets` with a traceback that names no file."""
    for files, split, fix in (
        (train, "training", "nothing to train the tokenizer and the model on"),
        (evals, "held-out", "nothing to evaluate on"),
    ):
        blank = [f for f in files if not check_text(f)]
        if len(blank) == len(files):
            shown = " ".join(map(str, blank[:3])) + (" ..." if len(blank) > 3 else "")
            raise InputError(
                f"the {len(files)} {split} document(s) hold only blank lines ({shown}): {fix}. Put "
                f"text in them, or point --data at the right files."
            )


# ----------------------------------------------------------------------------------------------
# Tokenizer and sequences, cached on disk
# ----------------------------------------------------------------------------------------------


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def corpus_fingerprint(args) -> str:
    if args.data is not None:
        # Path, size and modification time, as `datasets` keys local files: cheap on any corpus size.
        def stat(files):
            return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

        return fingerprint("files", stat(args.train_files), stat(args.eval_files))
    return fingerprint("dataset", args.dataset, args.dataset_config, args.text_column, args.eval_fraction, args.seed)


def load_text(args):
    """A DatasetDict with "train" and "eval" splits of one text column ("text"), whole documents held out."""
    hf_cache = str(args.cache_dir.expanduser() / "hf")
    if args.data is not None:
        files = {"train": [str(f) for f in args.train_files], "eval": [str(f) for f in args.eval_files]}
        return datasets.load_dataset("text", data_files=files, cache_dir=hf_cache)
    raw = datasets.load_dataset(args.dataset, args.dataset_config, cache_dir=hf_cache)
    held_out = next((s for s in ("validation", "test") if s in raw), None)
    if held_out is None:  # rows are documents (e.g. Wikipedia articles): hold out whole rows
        raw = raw["train"].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        held_out = "test"
    raw = datasets.DatasetDict(train=raw["train"], eval=raw[held_out])
    return raw.select_columns([args.text_column]).rename_column(args.text_column, "text")


def train_sentencepiece(text, vocab_size: int, path: Path) -> None:
    """Train the unigram model on the non-empty lines of ``text`` (a Dataset with a "text" column)."""

    def lines():
        for batch in text.iter(batch_size=10_000):  # streams from disk: any corpus size
            for doc in batch["text"]:
                for line in doc.splitlines():
                    if line.strip():
                        yield line.strip()

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as model_file:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model_file,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=CLS_ID,
            eos_id=SEP_ID,
            pad_piece="[PAD]",
            unk_piece="[UNK]",
            bos_piece="[CLS]",
            eos_piece="[SEP]",
            control_symbols=["[MASK]"],
            # Small corpora cannot fill a large vocabulary; large ones are sampled.
            hard_vocab_limit=False,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    tmp.replace(path)


def load_sentencepiece(path: Path):
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = tuple(sp.id_to_piece(i) for i in range(len(SPECIAL_PIECES)))
    if pieces != SPECIAL_PIECES:
        raise InputError(
            f"--tokenizer {path}: ids 0-4 are {pieces}, expected {SPECIAL_PIECES}. Use a model "
            f"this script trained (it is kept in --cache-dir), or leave --tokenizer out."
        )
    return sp


class _Tokenize:
    """Picklable map function for datasets (num_proc > 1): loads the sentencepiece model lazily."""

    def __init__(self, model_path: str):
        self.model_path, self.sp = model_path, None

    def __call__(self, batch):
        if self.sp is None:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        return {"ids": self.sp.encode(batch["text"])}


def pack_sequences(batch, seq_len):
    """Concatenate a batch's token ids (``batch["ids"]``, one list per document) and cut them into
    [CLS] + (seq_len - 2) tokens + [SEP]; the remainder is dropped."""
    body = seq_len - 2
    flat = [t for ids in batch["ids"] for t in ids]
    n = len(flat) // body * body
    return {"input_ids": [[CLS_ID] + flat[i : i + body] + [SEP_ID] for i in range(0, n, body)]}


@dataclass
class DataFiles:
    key: str  # corpus and tokenizer fingerprint
    tokenizer: Path
    sequences: dict[int, Path]  # seq_len -> save_to_disk directory with "train" and "eval"


def data_files(args, seq_lens) -> DataFiles:
    """Where the tokenizer and the tokenized sequences live in the cache (no work done here)."""
    cache = args.cache_dir.expanduser()
    corpus = corpus_fingerprint(args)
    if args.tokenizer is not None:
        tokenizer = args.tokenizer
        tok_key = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16]
    else:
        tokenizer = cache / "tokenizers" / f"spm-{corpus}-v{args.vocab_size}.model"
        tok_key = fingerprint(corpus, args.vocab_size)  # the model is a function of these
    key = f"{corpus}-{tok_key}"
    return DataFiles(key, tokenizer, {L: cache / "sequences" / f"{key}-seq{L}" for L in seq_lens})


def prepare_data(args, files: DataFiles) -> None:
    """Rank 0: train the tokenizer and build the sequences for every length, whatever is not cached yet."""
    todo = []
    for L, path in files.sequences.items():
        if (path / "dataset_dict.json").exists():
            log(f"data: reusing seq {L} sequences in {path}")
        else:
            todo.append(L)
    if files.tokenizer.exists():
        log(f"tokenizer: reusing {files.tokenizer}")
    if not todo:
        return
    if args.data is not None and not getattr(args, "documents_checked", False):
        check_documents(args.train_files, args.eval_files)  # callers that skipped check_inputs
    text = load_text(args)
    if not files.tokenizer.exists():
        files.tokenizer.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        train_sentencepiece(text["train"], args.vocab_size, files.tokenizer)
        log(
            f"tokenizer: trained a {args.vocab_size}-piece sentencepiece model on the training documents "
            f"in {time.time() - t0:.1f}s -> {files.tokenizer}"
        )
    load_sentencepiece(files.tokenizer)  # checks the special-token layout
    workers = args.preprocess_workers if args.preprocess_workers > 1 else None
    # Explicit fingerprints make `datasets` cache the map results (in --cache-dir/hf) by content
    # key, so a second sequence length reuses the tokenization.
    ids = datasets.DatasetDict(
        {
            split: ds.map(
                _Tokenize(str(files.tokenizer)),
                batched=True,
                remove_columns=ds.column_names,
                features=Features({"ids": Sequence(Value("int32"))}),
                num_proc=workers,
                new_fingerprint=f"tok-{files.key}-{split}",
                desc=f"tokenizing {split}",
            )
            for split, ds in text.items()
        }
    )
    for L in todo:
        t0 = time.time()
        features = Features({"input_ids": Sequence(Value("int32"), length=L)})
        seqs = datasets.DatasetDict(
            {
                split: ds.map(
                    pack_sequences,
                    fn_kwargs={"seq_len": L},
                    batched=True,
                    batch_size=1000,
                    remove_columns=["ids"],
                    features=features,
                    num_proc=workers,
                    new_fingerprint=f"grp-{files.key}-{split}-{L}",
                    desc=f"grouping {split} into {L}-token sequences",
                )
                for split, ds in ids.items()
            }
        )
        # Save under a temporary name and rename: a crash never leaves a half-written cache behind.
        path = files.sequences[L]
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        seqs.save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        log(
            f"data: {len(seqs['train'])} train / {len(seqs['eval'])} held-out sequences of {L} tokens "
            f"in {time.time() - t0:.1f}s -> {path}"
        )


def load_sequences(path: Path):
    return datasets.load_from_disk(str(path)).with_format("torch")


# ----------------------------------------------------------------------------------------------
# Masking and batches: deterministic functions of (seed, phase, step, micro-batch)
# ----------------------------------------------------------------------------------------------


def mask_tokens(input_ids, vocab_size: int, gen, mlm_probability: float = MLM_PROBABILITY):
    """BERT's masking: (inputs, labels) for a (batch, seq) LongTensor of token ids.

    Exactly round(15% of the non-special positions) per sequence are chosen, as in the original
    BERT data pipeline; of those 80% become [MASK], 10% a random non-special token, 10% stay.
    Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK], ids 0-4) are never chosen. Labels are -100
    (ignored by the loss) everywhere else.
    """
    special = input_ids < len(SPECIAL_PIECES)
    n_choose = max(1, round(mlm_probability * (input_ids.shape[1] - 2)))
    scores = torch.rand(input_ids.shape, generator=gen).masked_fill_(special, 2.0)
    chosen = torch.zeros_like(special).scatter_(1, scores.topk(n_choose, dim=1, largest=False).indices, True)
    chosen &= ~special
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIAL_PIECES), vocab_size, input_ids.shape, generator=gen)
    inputs = input_ids.clone()
    inputs[chosen & (action < 0.8)] = MASK_ID
    replace = chosen & (action >= 0.8) & (action < 0.9)
    inputs[replace] = random_ids[replace]
    return inputs, labels


class TrainBatches:
    """The micro-batches of a phase, a pure function of (step, micro-batch index).

    Step s takes the next train_batch_size samples of a stream of per-epoch permutations;
    micro-batch j (= rank x accumulation steps + accumulation index) is its j-th slice. So the
    data, the masks and (with the dropout seed) the whole step depend only on the step number:
    a resumed run replays exactly, and 2 nodes x 1 rank sees what 1 node x 2 ranks sees.

    ``phase``: anything with ``number``, ``train_batch_size`` and ``micro_batch_size``
    (:class:`pretraining.args.Phase`).
    """

    def __init__(self, sequences, phase, seed: int, vocab_size: int):
        self.sequences, self.phase, self.seed, self.vocab_size = sequences, phase, seed, vocab_size
        self.n = len(sequences)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one TrainBatches per phase, kept for the phase anyway
    def _permutation(self, epoch: int):
        return torch.randperm(self.n, generator=generator("order", self.seed, self.phase.number, epoch))

    def indices(self, step: int, micro: int, offset: int | None = None) -> list[int]:
        """Dataset rows of micro-batch ``micro`` of step ``step``; ``offset``: the samples taken
        before this step (default step × train_batch_size; a changing batch passes its own)."""
        start = (step * self.phase.train_batch_size if offset is None else offset) + micro * self.phase.micro_batch_size
        return [
            int(self._permutation(p // self.n)[p % self.n]) for p in range(start, start + self.phase.micro_batch_size)
        ]

    def __call__(self, step: int, micro: int, offset: int | None = None):
        """(inputs, labels) of micro-batch ``micro`` of step ``step`` (``offset`` as in :meth:`indices`)."""
        ids = self.sequences[self.indices(step, micro, offset)]["input_ids"].long()
        return mask_tokens(ids, self.vocab_size, generator("mask", self.seed, self.phase.number, step, micro))


def eval_masks(ids, first_index: int, vocab_size: int, seed: int):
    """:func:`mask_tokens` for held-out sequences ``first_index``, ``first_index + 1``, ...: one
    generator per sequence, so a sequence's masks do not depend on the micro-batch size or the
    world size, and runs with different configs are scored on the same task."""
    masked = [
        mask_tokens(ids[i : i + 1], vocab_size, generator("eval", seed, first_index + i)) for i in range(len(ids))
    ]
    return torch.cat([m[0] for m in masked]), torch.cat([m[1] for m in masked])


def unigram_baseline(
    train, held_out, n_eval: int, vocab_size: int, seed: int, max_train: int = 100_000
) -> tuple[int, float]:
    """(token, accuracy) of always predicting the most frequent label token of the training set,
    scored like :func:`evaluate` on the masked positions of the first ``n_eval`` held-out sequences.

    Masking picks non-special positions uniformly, so the most frequent label is the most
    frequent non-special token; it is counted on at most ``max_train`` evenly spaced training
    sequences (all of them in the demo). A model that has learned only the token frequencies
    (the "unigram plateau" early in training) scores about this.
    """
    counts = torch.zeros(vocab_size, dtype=torch.long)
    rows = range(0, len(train), max(1, len(train) // max_train))
    for start in range(0, len(rows), 8192):
        ids = train[list(rows[start : start + 8192])]["input_ids"].long()
        counts += torch.bincount(ids.flatten(), minlength=vocab_size)[:vocab_size]
    counts[: len(SPECIAL_PIECES)] = 0
    token = int(counts.argmax())
    ids = held_out[: min(n_eval, len(held_out))]["input_ids"].long()
    _, labels = eval_masks(ids, 0, vocab_size, seed)
    return token, (labels == token).sum().item() / (labels != -100).sum().item()
