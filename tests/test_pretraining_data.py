"""pretraining.data on its own, no process group: documents, the sentencepiece tokenizer trained on a
small generated corpus, packing into fixed-length sequences and the on-disk cache, BERT's masking
(rates, special tokens, determinism by seed), the batch order and the unigram baseline."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import datasets
import pytest
import sentencepiece as spm
import torch

from pretraining import InputError
from pretraining.args import Phase
from pretraining.data import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_PIECES,
    UNK_ID,
    TrainBatches,
    check_documents,
    check_text,
    data_files,
    eval_masks,
    find_documents,
    generator,
    load_sentencepiece,
    load_sequences,
    mask_tokens,
    pack_sequences,
    prepare_data,
    unigram_baseline,
)

WORDS = "the king queen sword crown ship storm island spirit magic book staff daughter father duke".split()
VOCAB = 120
SEQ_LENS = (16, 32)


def generated_corpus(root: Path, seed: int = 0) -> Path:
    """train/ (two documents) and eval/ (one), sentences of random words: < 1000 lines per split."""
    rng = random.Random(seed)
    for split, docs in (("train", ("a.txt", "b.txt")), ("eval", ("c.txt",))):
        (root / split).mkdir(parents=True)
        for name in docs:
            lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "." for _ in range(200)]
            (root / split / name).write_text("\n".join(lines[:100] + [""] + lines[100:]) + "\n")
    return root


def data_args(corpus: Path, cache: Path, **overrides) -> argparse.Namespace:
    """The attributes of pretrain_bert.py's arguments that pretraining.data reads."""
    args = argparse.Namespace(
        data=[corpus],
        dataset=None,
        dataset_config=None,
        text_column="text",
        eval_fraction=0.05,
        seed=0,
        tokenizer=None,
        vocab_size=VOCAB,
        cache_dir=cache,
        preprocess_workers=1,
    )
    vars(args).update(overrides)
    args.train_files, args.eval_files = find_documents(args.data, args.eval_fraction)
    return args


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The generated corpus tokenized at both lengths (the tokenizer trained on it): (args, files)."""
    root = tmp_path_factory.mktemp("data")
    args = data_args(generated_corpus(root / "corpus"), root / "cache")
    files = data_files(args, SEQ_LENS)
    prepare_data(args, files)
    return args, files


# ----------------------------------------------------------------------------------------------
# Tokenizer, sequences, cache
# ----------------------------------------------------------------------------------------------


def test_tokenizer_trained_on_the_corpus(prepared):
    args, files = prepared
    assert files.tokenizer.is_file() and files.tokenizer.parent == args.cache_dir / "tokenizers"
    sp = load_sentencepiece(files.tokenizer)  # checks the special-token layout
    assert tuple(sp.id_to_piece(i) for i in range(5)) == SPECIAL_PIECES
    assert (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID) == (0, 1, 2, 3, 4)
    assert len(SPECIAL_PIECES) < sp.get_piece_size() <= VOCAB  # a small corpus may not fill the vocabulary
    ids = sp.encode("the king sword")
    assert ids and min(ids) >= len(SPECIAL_PIECES) and sp.decode(ids) == "the king sword"
    assert sp.piece_to_id("[MASK]") == MASK_ID and sp.encode("[MASK]") != [MASK_ID]  # a control symbol


def test_sequences_are_the_token_stream_packed(prepared):
    """[CLS] + seq_len - 2 consecutive tokens of the concatenated documents + [SEP]; the tail dropped."""
    args, files = prepared
    sp = load_sentencepiece(files.tokenizer)
    for split, documents in (("train", args.train_files), ("eval", args.eval_files)):
        stream = [t for f in documents for line in f.read_text().splitlines() for t in sp.encode(line)]
        for seq_len in SEQ_LENS:
            rows = load_sequences(files.sequences[seq_len])[split][:]["input_ids"]
            body = seq_len - 2
            assert rows.shape == (len(stream) // body, seq_len)
            assert (rows[:, 0] == CLS_ID).all() and (rows[:, -1] == SEP_ID).all()
            assert rows[:, 1:-1].flatten().tolist() == stream[: len(rows) * body]


def test_cache_is_reused_and_keyed(prepared, capsys):
    args, files = prepared
    stamps = [p.stat().st_mtime_ns for p in (files.tokenizer, *files.sequences.values())]
    assert data_files(args, SEQ_LENS) == files  # same corpus and settings, same place
    prepare_data(args, files)
    out = capsys.readouterr().out
    assert "tokenizer: reusing" in out and "data: reusing seq 16" in out and "data: reusing seq 32" in out
    assert [p.stat().st_mtime_ns for p in (files.tokenizer, *files.sequences.values())] == stamps
    # Another vocabulary: another tokenizer and other sequences; another length: other sequences only.
    other = data_files(argparse.Namespace(**{**vars(args), "vocab_size": VOCAB + 1}), SEQ_LENS)
    assert other.tokenizer != files.tokenizer and not set(other.sequences.values()) & set(files.sequences.values())
    assert data_files(args, [64]).sequences[64] not in files.sequences.values()
    # A given tokenizer is keyed by its content, not its path.
    copy = args.cache_dir.parent / "copy.model"
    copy.write_bytes(files.tokenizer.read_bytes())
    given = data_files(argparse.Namespace(**{**vars(args), "tokenizer": copy}), SEQ_LENS)
    assert (
        given.tokenizer == copy
        and given.key == data_files(argparse.Namespace(**{**vars(args), "tokenizer": files.tokenizer}), SEQ_LENS).key
    )


def test_pack_sequences():
    batch = {"ids": [[10, 11, 12], [13], [], [14, 15, 16, 17]]}
    assert pack_sequences(batch, seq_len=5) == {
        "input_ids": [[CLS_ID, 10, 11, 12, SEP_ID], [CLS_ID, 13, 14, 15, SEP_ID]]  # 16, 17 dropped
    }
    assert pack_sequences({"ids": [[10, 11]]}, seq_len=5) == {"input_ids": []}


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    """A sentencepiece model with the library's default ids (<unk>=0, <s>=1, </s>=2) is not ours."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "other"), vocab_size=60, minloglevel=2, hard_vocab_limit=False
    )
    with pytest.raises(InputError, match=r"other.model: ids 0-4 are \('<unk>', '<s>', '</s>'"):
        load_sentencepiece(tmp_path / "other.model")


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------


def test_bad_documents(tmp_path):
    with pytest.raises(InputError, match=r"--data \S+/missing: no such file or directory"):
        find_documents([tmp_path / "missing"], 0.1)
    (tmp_path / "one.txt").write_text("a single document\n")
    with pytest.raises(InputError, match=r"found 1 .txt document\(s\); need at least 2"):
        find_documents([tmp_path / "one.txt"], 0.1)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(InputError, match=r"the 1 training document\(s\) hold only blank lines"):
        check_documents([tmp_path / "blank.txt"], [tmp_path / "one.txt"])
    check_documents([tmp_path / "one.txt", tmp_path / "blank.txt"], [tmp_path / "one.txt"])  # one is enough


def test_check_text_streams_in_chunks(tmp_path):
    """A character cut by a chunk boundary is fine; a cut-off one at the end, or a stray byte, is not."""
    f = tmp_path / "doc.txt"
    f.write_text("\u00e9t\u00e9 \u20ac \U0001f600\n" * 50, encoding="utf-8")
    assert all(check_text(f, chunk_size=size) for size in (1, 2, 3, 5, 7))
    f.write_bytes(b"  \n\n")
    assert not check_text(f, chunk_size=1)
    f.write_bytes(b"ok\nok\n\xe2\x82")  # a euro sign without its last byte
    for size in (1, 2, 4, 100):
        with pytest.raises(InputError, match=r"byte 0xe2 at line 3, byte offset 6\)"):
            check_text(f, chunk_size=size)
    f.write_bytes(b"ok\n\xff ok\n")
    with pytest.raises(InputError, match=r"byte 0xff at line 2, byte offset 3\)"):
        check_text(f, chunk_size=2)


def test_documents_held_out_whole(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    train, held_out = find_documents([tmp_path], eval_fraction=0.1)
    assert len(held_out) == 2 and len(train) == 18 and not set(train) & set(held_out)
    assert find_documents([tmp_path], eval_fraction=0.1) == (train, held_out)  # deterministic


# ----------------------------------------------------------------------------------------------
# Masking and batches
# ----------------------------------------------------------------------------------------------


def test_mask_tokens():
    vocab, seq = 1000, 128
    ids = torch.randint(len(SPECIAL_PIECES), vocab, (64, seq))
    ids[:, 0], ids[:, -1], ids[:, 10] = CLS_ID, SEP_ID, UNK_ID
    inputs, labels = mask_tokens(ids, vocab, generator("test"))
    chosen = labels != -100
    assert (chosen.sum(1) == round(0.15 * (seq - 2))).all()  # exactly 15% per sequence
    assert not chosen[:, [0, 10, -1]].any()  # special tokens never
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == MASK_ID) & chosen
    kept = (inputs == ids) & chosen
    n = chosen.sum().item()
    assert 0.75 < masked.sum().item() / n < 0.85
    assert 0.06 < kept.sum().item() / n < 0.14
    assert (inputs[chosen & ~masked & ~kept] >= len(SPECIAL_PIECES)).all()  # random tokens are not special
    again = mask_tokens(ids, vocab, generator("test"))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_eval_masks_do_not_depend_on_micro_batch_size():
    vocab = 1000
    ids = torch.randint(len(SPECIAL_PIECES), vocab, (8, 32))
    whole = eval_masks(ids, 0, vocab, seed=3)
    for chunk in (1, 2, 3):
        parts = [eval_masks(ids[a : a + chunk], a, vocab, seed=3) for a in range(0, len(ids), chunk)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert not torch.equal(eval_masks(ids, 0, vocab, seed=4)[1], whole[1])


def test_train_batches():
    """A pure function of (step, micro-batch); an epoch is a permutation: no row repeats within it."""
    rows = {"input_ids": torch.arange(5, 105)[:, None].repeat(1, 16)}  # row i is all token i + 5
    phase = Phase(1, Path("x"), {}, 16, steps=10, train_batch_size=32, micro_batch_size=8, grad_accum=2)
    a = TrainBatches(datasets.Dataset.from_dict(rows).with_format("torch"), phase, 0, 1000)
    b = TrainBatches(datasets.Dataset.from_dict(rows).with_format("torch"), phase, 0, 1000)
    assert all(torch.equal(x, y) for x, y in zip(a(3, 1), b(3, 1)))
    first_epoch = [i for step in range(3) for micro in range(4) for i in a.indices(step, micro)]  # 96 of 100 rows
    assert len(set(first_epoch)) == 96
    inputs, labels = a(0, 0)
    assert torch.equal(
        labels[labels != -100], (torch.tensor(a.indices(0, 0)) + 5)[:, None].expand(8, 16)[labels != -100]
    )
    assert a.indices(0, 0) != TrainBatches(a.sequences, phase, 1, 1000).indices(0, 0)  # the seed matters


def test_unigram_baseline():
    """The most frequent non-special token of the training set, scored on evaluate()'s masks."""
    vocab, seq = 50, 32
    rows = torch.randint(len(SPECIAL_PIECES), vocab, (40, seq))
    rows[:, 1:12] = 7  # token 7 is the most frequent by far
    rows[:, 12:30] = UNK_ID  # specials are never labels, however frequent
    rows[:, 0], rows[:, -1] = CLS_ID, SEP_ID
    train = datasets.Dataset.from_dict({"input_ids": rows}).with_format("torch")
    held_out = datasets.Dataset.from_dict({"input_ids": rows[:10]}).with_format("torch")
    token, accuracy = unigram_baseline(train, held_out, n_eval=8, vocab_size=vocab, seed=3)
    assert token == 7
    _, labels = eval_masks(rows[:8], 0, vocab, seed=3)
    assert accuracy == pytest.approx((labels == 7).sum().item() / (labels != -100).sum().item())
    assert 0.4 < accuracy < 1  # 11 of the 12 maskable positions per row hold token 7
    assert unigram_baseline(train, held_out, 8, vocab, 3, max_train=4) == (token, accuracy)


def test_masking_never_touches_special_tokens_and_follows_the_seed():
    """[PAD] [UNK] [CLS] [SEP] [MASK] in the input are never chosen, at any rate; a sequence with
    fewer maskable tokens than 15% of its length gets them all chosen, never a special one."""
    vocab = 50
    ids = torch.randint(len(SPECIAL_PIECES), vocab, (200, 40))
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    ids[:, 30:39] = PAD_ID
    ids[::2, 5], ids[1::2, 6], ids[::3, 7] = UNK_ID, MASK_ID, MASK_ID
    special = ids < len(SPECIAL_PIECES)
    for probability in (0.15, 0.5):
        inputs, labels = mask_tokens(ids, vocab, generator("rates", probability), mlm_probability=probability)
        chosen = labels != -100
        assert not chosen[special].any() and torch.equal(inputs[special], ids[special])
        assert (chosen.sum(1) == round(probability * 38)).all()
    few = torch.full((1, 40), PAD_ID)
    few[0, :4] = torch.tensor([CLS_ID, 7, 8, SEP_ID])
    inputs, labels = mask_tokens(few, vocab, generator("few"))
    assert (labels != -100).nonzero()[:, 1].tolist() == [1, 2]
    # The same generator seed gives the same masks; another seed other ones.
    a, b = mask_tokens(ids, vocab, generator("seed", 1)), mask_tokens(ids, vocab, generator("seed", 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(mask_tokens(ids, vocab, generator("seed", 2))[1], a[1])


def test_train_batches_follow_the_seed_and_phase():
    rows = {"input_ids": torch.arange(5, 69)[:, None].repeat(1, 8)}
    sequences = datasets.Dataset.from_dict(rows).with_format("torch")
    phase = Phase(1, Path("x"), {}, 8, steps=4, train_batch_size=16, micro_batch_size=4, grad_accum=2)
    order = [TrainBatches(sequences, phase, 0, 100).indices(s, m) for s in range(4) for m in range(4)]
    assert sorted(i for part in order for i in part) == list(range(64))  # one epoch: each row once
    again = TrainBatches(sequences, phase, 0, 100)
    assert order == [again.indices(s, m) for s in range(4) for m in range(4)]
    phase2 = Phase(2, Path("x"), {}, 8, steps=4, train_batch_size=16, micro_batch_size=4, grad_accum=2)
    assert TrainBatches(sequences, phase2, 0, 100).indices(0, 0) != order[0]
    assert TrainBatches(sequences, phase, 0, 100).indices(4, 0) != order[0]  # epoch 2: another permutation
