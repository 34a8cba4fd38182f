"""kdlab/data/text.py: a local text corpus read, split by document, tokenised and packed for causal LMs.

Checked on small files written here (their documents and windows counted by hand) and on the real
default corpus, Debian's fortunes, which CI installs like Fashion-MNIST.
"""

from __future__ import annotations

import pytest
import torch

from kdlab.data.text import (
    IGNORE_INDEX,
    ByteTokenizer,
    TextCorpusDataModule,
    pack,
    read_documents,
    split_documents,
)
from kdlab.errors import KdlabError


def test_documents_are_the_blocks_between_percent_lines(tmp_path):
    (tmp_path / "a.u8").write_text("first\nquote\n%\nsecond\n%\n\n%\nthird\n", encoding="utf-8")
    (tmp_path / "b.u8").write_text("fourth é\n", encoding="utf-8")
    (tmp_path / "skip.dat").write_bytes(b"\x00\x01")
    assert read_documents(tmp_path) == ["first\nquote", "second", "third", "fourth é"]
    assert read_documents(tmp_path / "a.u8", separator=None) == ["first\nquote\n%\nsecond\n%\n\n%\nthird"]


def test_splits_are_by_document_seeded_and_disjoint():
    documents = [f"doc {i}" for i in range(100)]
    splits = split_documents(documents, 0.1, 0.2, seed=3)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(sum(splits.values(), [])) == sorted(documents)
    assert split_documents(documents, 0.1, 0.2, seed=3) == splits
    assert split_documents(documents, 0.1, 0.2, seed=4) != splits


def test_packing_gives_next_token_targets_and_pads_only_the_tail():
    tokenizer = ByteTokenizer()
    inputs, targets = pack(["ab", "cde"], tokenizer, seq_len=3)
    # The stream is each document, then end-of-document: 97 98 256 99 100 101 256.
    assert inputs.tolist() == [[97, 98, 256], [99, 100, 101]]
    assert targets.tolist() == [[98, 256, 99], [100, 101, 256]]
    inputs, targets = pack(["ab", "cdef"], tokenizer, seq_len=3)  # 8 tokens: 7 predictions, 3 windows
    assert inputs.tolist()[-1] == [102, 0, 0] and targets.tolist()[-1] == [256, IGNORE_INDEX, IGNORE_INDEX]
    stream = [97, 98, 256, 99, 100, 101, 102, 256]
    predicted = [t for row in targets.tolist() for t in row if t != IGNORE_INDEX]
    assert predicted == stream[1:]
    assert (targets[-1] == IGNORE_INDEX).sum() == 2  # the tail window holds one prediction


def test_bytes_round_trip_utf8():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("naïve – ok")) == "naïve – ok"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tokenizer": "words"}, r"data.tokenizer='words' is not one kdlab builds"),
        ({"seq_len": 0}, r"data.seq_len=0 must be a whole number >= 1"),
        ({"tokenizer": "bpe", "vocab_size": 100}, r"data.vocab_size=100: a byte-level BPE"),
    ],
)
def test_bad_settings_name_the_key(options, message):
    with pytest.raises(KdlabError, match=message):
        TextCorpusDataModule(**options)


def test_an_empty_or_missing_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.u8").write_text("%\n\n%\n", encoding="utf-8")
    with pytest.raises(KdlabError, match=r"has no text: 1 file\(s\) matching '\*.u8'"):
        TextCorpusDataModule(root=str(tmp_path)).setup()
    with pytest.raises(KdlabError, match=r"is neither a text file nor a directory"):
        TextCorpusDataModule(root=str(tmp_path / "nowhere")).setup()


def test_the_default_corpus_is_debians_fortunes(fortunes):
    documents = read_documents(fortunes)
    assert len(documents) > 10_000 and sum(map(len, documents)) > 2_000_000
    data = TextCorpusDataModule(seq_len=64, batch_size=8)
    batch = next(iter(data.train_dataloader()))
    assert batch["input"].shape == batch["target"].shape == (8, 64)
    # The target is the input shifted by one token, within a window.
    assert torch.equal(batch["input"][:, 1:], batch["target"][:, :-1])
    assert data.vocab_size == 257


def test_a_bpe_trained_on_the_training_split_compresses_the_text(tmp_path, fortunes):
    (tmp_path / "some.u8").write_text(
        (fortunes / "fortunes.u8").read_text(encoding="utf-8"), encoding="utf-8"
    )
    as_bytes = TextCorpusDataModule(root=str(tmp_path), seq_len=32)
    as_bpe = TextCorpusDataModule(root=str(tmp_path), seq_len=32, tokenizer="bpe", vocab_size=400)
    as_bytes.setup(), as_bpe.setup()
    assert as_bpe.vocab_size == 400
    assert len(as_bpe.splits["train"]) < 0.8 * len(as_bytes.splits["train"])
    text = "A visit to a fresh place will bring strange work."
    assert as_bpe.tokenizer.decode(as_bpe.tokenizer.encode(text)) == text


def test_a_hugging_face_dataset_saved_to_disk_is_a_corpus(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["first document", "", "second one", "third"], "id": [1, 2, 3, 4]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    assert read_documents(tmp_path / "one") == ["first document", "second one", "third"]
    split = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}
    )
    split.save_to_disk(str(tmp_path / "dict"))
    assert read_documents(tmp_path / "dict") == ["first document", "second one", "third"]
    data = TextCorpusDataModule(root=str(tmp_path / "one"), seq_len=4, val_fraction=0.0, test_fraction=0.0)
    data.setup()
    # 14 + 10 + 5 bytes and 3 end-of-document tokens: 32 tokens, 31 next-token pairs, in windows of 4.
    assert len(data.splits["train"]) == 8
    with pytest.raises(
        KdlabError, match=r"has no column data.text_field='body'; its columns are \['text', 'id'\]"
    ):
        read_documents(tmp_path / "one", text_field="body")
