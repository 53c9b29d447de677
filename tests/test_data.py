"""Local data pipeline: .txt / .jsonl / .npy / .bin loading, chunking, packing, collators."""

import json
import random

import numpy as np
import pytest
import torch

from drope import data

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "runs", "sleeps", "the", "a"]


def random_text(rng: random.Random, n_sentences: int) -> str:
    """Sentences from a tiny grammar: learnable, so a tiny model's loss falls within a few dozen steps."""
    out = []
    for _ in range(n_sentences):
        out.append(f"the {rng.choice(WORDS[4:7])} {rng.choice(WORDS[7:9])} {rng.choice(WORDS[9:11])} .")
    return " ".join(out)


def tiny_tokenizer(texts=None, vocab_size: int = 96):
    """A byte-level BPE trained locally in well under a second, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        rng = random.Random(0)
        texts = [random_text(rng, 20) for _ in range(20)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_txt_one_document_per_file_with_eos(tmp_path, tokenizer):
    texts = ["the red cat runs .", "a blue dog sleeps . the green cat runs ."]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    docs = data.load_documents(tmp_path, tokenizer)
    assert len(docs) == 2
    for doc, text in zip(docs, texts):
        assert doc.dtype == np.int32
        assert doc[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(doc[:-1].tolist()) == text


def test_jsonl_one_document_per_line(tmp_path, tokenizer):
    texts = ["the red cat runs .", "a dog .", "the blue dog sleeps ."]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    docs = data.load_documents(path, tokenizer, add_eos=False)
    assert [tokenizer.decode(d.tolist()) for d in docs] == texts
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        data.load_documents(path, tokenizer)
    docs = data.load_documents(path, tokenizer, text_field="body", add_eos=False)
    assert tokenizer.decode(docs[0].tolist()) == "x"
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="d.jsonl:1"):
        data.load_documents(path, tokenizer)


def test_npy_and_bin_token_files(tmp_path):
    rng = np.random.default_rng()
    one = rng.integers(0, 500, size=37)
    rows = rng.integers(0, 500, size=(3, 11)).astype(np.int32)
    raw = rng.integers(0, 60000, size=29).astype(np.uint16)
    np.save(tmp_path / "a.npy", one)
    np.save(tmp_path / "b.npy", rows)
    raw.tofile(tmp_path / "c.bin")
    docs = data.load_documents(tmp_path)
    assert [d.tolist() for d in docs] == [one.tolist()] + rows.tolist() + [raw.tolist()]
    raw32 = rng.integers(0, 100000, size=9).astype(np.uint32)
    raw32.tofile(tmp_path / "d.bin")
    assert data.load_documents(tmp_path / "d.bin", bin_dtype="uint32")[0].tolist() == raw32.tolist()


@pytest.mark.parametrize("case", ["missing", "suffix", "empty-dir", "text-no-tokenizer", "float-npy", "negative",
                                  "3d-npy", "vocab", "float-bin-dtype", "huge-id"])
def test_bad_input(tmp_path, case):
    if case == "missing":
        args, match = (tmp_path / "nope.txt",), "does not exist"
    elif case == "suffix":
        (tmp_path / "x.csv").write_text("a,b")
        args, match = (tmp_path / "x.csv",), "unsupported type '.csv'"
    elif case == "empty-dir":
        (tmp_path / "x.csv").write_text("a,b")
        args, match = (tmp_path,), "no data files"
    elif case == "text-no-tokenizer":
        (tmp_path / "x.txt").write_text("hello")
        args, match = (tmp_path / "x.txt",), "tokenizer is needed"
    elif case == "float-npy":
        np.save(tmp_path / "x.npy", np.ones(4))
        args, match = (tmp_path / "x.npy",), "must be integers"
    elif case == "negative":
        np.save(tmp_path / "x.npy", np.array([1, -2, 3]))
        args, match = (tmp_path / "x.npy",), "negative"
    elif case == "3d-npy":
        np.save(tmp_path / "x.npy", np.ones((2, 2, 2), dtype=np.int64))
        args, match = (tmp_path / "x.npy",), "1-D or 2-D"
    elif case == "vocab":
        np.save(tmp_path / "x.npy", np.array([1, 2, 300]))
        with pytest.raises(ValueError, match="token id 300, outside the model's vocabulary of 256"):
            data.load_documents(tmp_path / "x.npy", vocab_size=256)
        return
    elif case == "huge-id":
        np.array([1, 2**31], dtype=np.uint32).tofile(tmp_path / "x.bin")
        with pytest.raises(ValueError, match="beyond any vocabulary"):
            data.load_documents(tmp_path / "x.bin", bin_dtype="uint32")
        return
    else:
        np.arange(4, dtype=np.uint16).tofile(tmp_path / "x.bin")
        with pytest.raises(ValueError, match="bin_dtype must be an integer"):
            data.load_documents(tmp_path / "x.bin", bin_dtype="float32")
        return
    with pytest.raises(ValueError, match=match):
        data.load_documents(*args)


@pytest.mark.parametrize("seq_len", [2, 7, 16], ids=lambda s: f"L{s}")
def test_chunking_is_the_concatenated_stream(seq_len):
    rng = np.random.default_rng()
    docs = [rng.integers(5, 100, size=n) for n in (1, 9, 23, 4)]
    sep = 0
    chunks = data.chunk_documents(docs, seq_len, separator_id=sep)
    stream = np.concatenate([np.append(d, sep) for d in docs])
    n = stream.size // seq_len
    assert chunks.shape == (n, seq_len) and chunks.dtype == torch.int32
    assert chunks.reshape(-1).tolist() == stream[: n * seq_len].tolist()
    plain = np.concatenate(docs)
    assert data.chunk_documents(docs, seq_len).reshape(-1).tolist() == plain[: plain.size // seq_len * seq_len].tolist()


def test_chunking_bad_input():
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        data.chunk_documents([np.arange(10)], 1)
    with pytest.raises(ValueError, match="fewer than one row of seq_len=16"):
        data.chunk_documents([np.arange(10)], 16)


@pytest.mark.parametrize("seq_len", [5, 8, 32], ids=lambda s: f"L{s}")
def test_packing_keeps_order_and_limit(seq_len):
    rng = np.random.default_rng()
    docs = [rng.integers(5, 100, size=n) for n in (3, 1, 12, 5, 2, 9, 4, 17)]
    packs = data.pack_documents(docs, seq_len)
    for pack in packs:
        assert 0 < sum(p.numel() for p in pack) <= seq_len
        assert all(p.numel() >= 2 for p in pack)
    # every token of every piece of >= 2 tokens, in order
    expected = [t for d in docs for piece in np.array_split(d, range(seq_len, d.size, seq_len)) if piece.size >= 2
                for t in piece.tolist()]
    assert [t for pack in packs for p in pack for t in p.tolist()] == expected
    # greedy: the first piece of the next pack would not have fit
    for a, b in zip(packs[:-1], packs[1:]):
        assert sum(p.numel() for p in a) + b[0].numel() > seq_len


def test_packed_collator_boundaries():
    rng = np.random.default_rng()
    docs = [rng.integers(5, 100, size=n) for n in (3, 6, 2, 7, 5)]
    packs = data.pack_documents(docs, 10)
    assert [[p.numel() for p in pack] for pack in packs] == [[3, 6], [2, 7], [5]]
    ds = data.PackDataset(packs)
    batch = data.PackedCollator()([ds[0], ds[1]])
    lens = [3, 6, 2, 7]
    cu = torch.tensor([0, 3, 9, 11, 18], dtype=torch.int32)
    assert batch["input_ids"].shape == (1, 18) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][0].tolist() == np.concatenate(docs[:4]).tolist()
    assert torch.equal(batch["cu_seq_lens_q"], cu) and torch.equal(batch["cu_seq_lens_k"], cu)
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    assert batch["position_ids"][0].tolist() == [i for n in lens for i in range(n)]
    labels = batch["labels"][0]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert labels[start] == -100
        assert labels[start + 1:end].tolist() == batch["input_ids"][0, start + 1:end].tolist()


def test_chunk_collator_and_dataset():
    chunks = torch.randint(0, 50, (5, 8), dtype=torch.int32)
    ds = data.ChunkDataset(chunks)
    assert len(ds) == 5
    batch = data.CausalLMCollator()([ds[1], ds[3]])
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["input_ids"], chunks[[1, 3]].long())
    assert torch.equal(batch["labels"], chunks[[1, 3]].long())
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
