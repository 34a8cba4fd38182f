"""Text for causal language modelling: documents read from local files, tokenised, split and packed.

The corpus is any local text file, a directory of them (`pattern` picks the files), or a Hugging Face
dataset saved to disk (`save_to_disk`'s directory: its `text_field` column, of its train split for a
DatasetDict; read with the `datasets` package, in the `lm` extra). The offline
default is Debian's `fortunes` package: about 2.5 MB of English quotations, jokes and verse in 44 UTF-8
files under /usr/share/games/fortunes (`*.u8`), one entry per `%`-separated block, under the BSD
licence of fortune-mod (/usr/share/doc/fortunes/copyright). Nothing is downloaded.

- **Documents** are a file's `separator`-delimited blocks (a line holding only `%` in the fortune
  format), or the whole file without a separator. Empty ones are dropped.
- **Splits** are by document: a seeded permutation puts `val_fraction` and `test_fraction` of the
  documents in validation and test, so no text is in two splits.
- **Tokens**: `bytes` (each UTF-8 byte a token, 256 of them, plus end-of-document; nothing to train,
  nothing to download), or a byte-level BPE of `vocab_size` tokens trained on the training split with
  Hugging Face's `tokenizers` (the same split and settings give the same tokenizer).
- **Packing**: each split's documents are concatenated, each followed by the end-of-document token,
  and cut into windows of `seq_len + 1` tokens; a window gives `input` (its first `seq_len` tokens) and
  `target` (the next token at each position), so no position is padding. The tail shorter than a
  window is kept, its missing positions padded and their targets -100 (positions that do not count).

Batches are `{"input": [B, T] token ids, "target": [B, T] next-token ids (-100: not counted),
"index": [B] window index}`, the image task's keys with sequence shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kdlab.data.base import EpochShuffle, run_seed
from kdlab.errors import KdlabError

FORTUNES = Path("/usr/share/games/fortunes")
# Hugging Face's label for a position that does not count (padding, a prompt token); the losses read it too.
IGNORE_INDEX = -100
BYTE_VOCAB = 256
TOKENIZERS = ("bytes", "bpe")


# What `save_to_disk` writes beside the data: a Dataset's state, or a DatasetDict's list of splits.
HF_MARKERS = ("state.json", "dataset_dict.json")


def read_documents(
    root: str | Path, pattern: str = "*.u8", separator: str | None = "%", text_field: str = "text"
) -> list[str]:
    """The corpus's documents, in a fixed order (files sorted by name, blocks in file order; a saved
    Hugging Face dataset's rows in order)."""
    root = Path(root).expanduser()
    if root.is_dir() and any((root / marker).exists() for marker in HF_MARKERS):
        documents = [text for text in saved_dataset_texts(root, text_field) if text and text.strip()]
        if not documents:
            raise KdlabError(
                f"The Hugging Face dataset at data.root={str(root)!r} has no non-empty text in its "
                f"{text_field!r} column. Point data.text_field at the column holding the text."
            )
        return documents
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob(pattern) if p.is_file())
    else:
        raise KdlabError(
            f"data.root={str(root)!r} is neither a text file nor a directory. Point data.root at your corpus "
            f"(a .txt file, or a directory of files matching data.pattern), or install Debian's fortunes "
            f"package (apt-get install fortunes) for the default corpus in {FORTUNES}."
        )
    documents = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        blocks = _blocks(text, separator) if separator else [text]
        documents += [block.strip("\n") for block in blocks if block.strip()]
    if not documents:
        what = f"{len(files)} file(s) matching {pattern!r}" if root.is_dir() else "the file"
        raise KdlabError(
            f"The corpus at data.root={str(root)!r} has no text: {what}, no non-empty document. Point "
            f"data.root at a text file or a directory of them, and set data.pattern to match its files "
            f"(e.g. data.pattern='*.txt')."
        )
    return documents


def saved_dataset_texts(root: Path, text_field: str) -> list[str]:
    """The `text_field` column of a dataset written by `datasets`' save_to_disk (of a DatasetDict: its
    train split)."""
    try:
        import datasets
    except ImportError as error:
        raise KdlabError(
            f"data.root={str(root)!r} is a Hugging Face dataset saved to disk, which the datasets package "
            "reads: pip install 'datasets>=3' (kdlab's lm extra), then rerun."
        ) from error
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise KdlabError(
                f"The Hugging Face dataset at data.root={str(root)!r} has the splits {sorted(loaded)}, and "
                "kdlab reads its train split (and splits it by document itself). Point data.root at one "
                "split's directory instead."
            )
        loaded = loaded["train"]
    if text_field not in loaded.column_names:
        raise KdlabError(
            f"The Hugging Face dataset at data.root={str(root)!r} has no column "
            f"data.text_field={text_field!r}; its columns are {loaded.column_names}. Set data.text_field to "
            "the one holding the text."
        )
    return list(loaded[text_field])


def _blocks(text: str, separator: str) -> list[str]:
    """The blocks between lines that hold only `separator`."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip() == separator:
            blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    blocks.append("\n".join(current))
    return blocks


def split_documents(
    documents: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """train/val/test by document, through a permutation seeded with `seed`."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise KdlabError(f"data.{name}={value!r} must be a fraction in [0, 1), e.g. data.{name}=0.05.")
    order = np.random.default_rng(seed).permutation(len(documents))
    n_val, n_test = round(len(documents) * val_fraction), round(len(documents) * test_fraction)
    if len(documents) - n_val - n_test < 1:
        raise KdlabError(
            f"The corpus has {len(documents)} document(s), too few for a training split after "
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction}. Use a larger corpus."
        )
    picked = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }
    return {name: [documents[i] for i in sorted(index)] for name, index in picked.items()}


class ByteTokenizer:
    """Each UTF-8 byte a token (0..255), and 256 ends a document."""

    vocab_size = BYTE_VOCAB + 1
    eos_id = BYTE_VOCAB
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained on the training documents with Hugging Face's `tokenizers`."""

    name = "bpe"
    EOS = "<|endoftext|>"

    def __init__(self, documents: Sequence[str], vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[self.EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(documents, trainer=trainer)
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(self.EOS)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id])


def pack(documents: Sequence[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each `[windows, seq_len]`: the documents' tokens, each followed by the
    end-of-document token, in windows of seq_len + 1 (see the module docstring)."""
    stream = []
    for document in documents:
        stream += tokenizer.encode(document)
        stream.append(tokenizer.eos_id)
    tokens = torch.tensor(stream, dtype=torch.int64)
    windows = max((len(tokens) - 1 + seq_len - 1) // seq_len, 0)  # the last one may be short
    # The stream padded to whole windows (+1 for the last label); window w reads tokens w*T .. w*T + T.
    padded = torch.full((windows * seq_len + 1,), IGNORE_INDEX, dtype=torch.int64)
    padded[: min(len(tokens), len(padded))] = tokens[: len(padded)]
    targets = padded[1:].view(windows, seq_len).clone()
    # A position without a next token is padding, and reads token 0.
    inputs = padded[:-1].view(windows, seq_len).masked_fill(targets == IGNORE_INDEX, 0)
    return inputs, targets


class PackedText(Dataset):
    """Windows of packed tokens, as batch items {"input", "target", "index"}."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input": self.inputs[index], "target": self.targets[index], "index": torch.tensor(index)}


class TextCorpusDataModule(L.LightningDataModule):
    """A local text corpus for causal language modelling (see the module docstring)."""

    name = "text corpus"

    def __init__(
        self,
        root: str | None = None,
        pattern: str = "*.u8",
        separator: str | None = "%",
        text_field: str = "text",
        tokenizer: str = "bytes",
        vocab_size: int = BYTE_VOCAB + 1,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        if tokenizer not in TOKENIZERS:
            raise KdlabError(
                f"data.tokenizer={tokenizer!r} is not one kdlab builds: use bytes (UTF-8 bytes, nothing to "
                "train) or bpe (a byte-level BPE of data.vocab_size tokens trained on the training split)."
            )
        for key, value, smallest in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise KdlabError(
                    f"data.{key}={value!r} must be a whole number >= {smallest}, e.g. data.{key}=128."
                )
        if tokenizer == "bytes" and vocab_size != ByteTokenizer.vocab_size:
            raise KdlabError(
                f"data.vocab_size={vocab_size!r} with data.tokenizer=bytes: the byte tokenizer has "
                f"{ByteTokenizer.vocab_size} tokens (256 bytes and end-of-document), and the models are "
                f"built for data.vocab_size. Set data.vocab_size={ByteTokenizer.vocab_size}, or "
                "data.tokenizer=bpe to train a tokenizer of data.vocab_size tokens."
            )
        if tokenizer == "bpe" and (not isinstance(vocab_size, int) or vocab_size <= BYTE_VOCAB):
            raise KdlabError(
                f"data.vocab_size={vocab_size!r}: a byte-level BPE starts from the 256 bytes, so its "
                "vocabulary is larger, e.g. data.vocab_size=512."
            )
        self.root = Path(root).expanduser() if root else FORTUNES
        self.pattern, self.separator, self.text_field = pattern, separator, text_field
        self.tokenizer_kind, self.requested_vocab_size = tokenizer, vocab_size
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.tokenizer = None
        self.splits: dict[str, PackedText] = {}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (known without reading the corpus for bytes)."""
        if self.tokenizer_kind == "bytes":
            return ByteTokenizer.vocab_size
        self.setup()
        return self.tokenizer.vocab_size

    @property
    def num_classes(self) -> int:
        """What a model predicts at each position: one of the vocabulary's tokens."""
        return self.vocab_size

    @property
    def input_shape(self) -> tuple[int]:
        return (self.seq_len,)

    @property
    def task(self):
        """Next-token prediction on this corpus's tokens (kdlab.tasks)."""
        from kdlab.tasks import LanguageModeling  # kdlab.tasks reads this module's IGNORE_INDEX

        return LanguageModeling(self.vocab_size, self.seq_len)

    @property
    def train_split_size(self) -> int:
        self.setup()
        return len(self.splits["train"])

    # What the teacher-output cache reads (kdlab.teacher_cache): windows are not augmented, so a
    # teacher's outputs on them are fixed and can be stored once; the validation documents are held out.
    train_transform_is_random = False
    train_transform = eval_transform = None
    validation_from_training_split = False

    @property
    def train_set(self) -> Subset:
        """The training windows, as a Subset of the split (the form the teacher-output cache reads)."""
        self.setup()
        return Subset(self.splits["train"], range(len(self.splits["train"])))

    @property
    def val_set(self) -> PackedText:
        self.setup()
        return self.splits["val"]

    def fingerprint(self) -> str:
        """A digest of the training windows' tokens, for caches of a teacher's outputs on them."""
        self.setup()
        return hashlib.sha256(self.splits["train"].inputs.numpy().tobytes()).hexdigest()[:16]

    def use_views(self, names: Sequence[str], wanted_by: str = "the knowledge") -> None:
        """Extra augmented views are an image notion: a loss that reads one cannot run on text."""
        if names:
            raise KdlabError(
                f"{wanted_by} reads extra augmented views of each sample ({', '.join(names)}), which text "
                "has none of. Use a loss without views with task=lm (e.g. knowledge=response)."
            )

    def corpus_key(self) -> str:
        """A digest of the corpus's text and the settings that shape the data, for stores to key on."""
        digest = hashlib.sha256()
        for document in read_documents(self.root, self.pattern, self.separator, self.text_field):
            digest.update(document.encode("utf-8"))
        settings = (
            self.tokenizer_kind,
            self.requested_vocab_size,
            self.seq_len,
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
        )
        digest.update(repr(settings).encode())
        return digest.hexdigest()[:16]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        documents = split_documents(
            read_documents(self.root, self.pattern, self.separator, self.text_field),
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
        )
        if self.tokenizer_kind == "bytes":
            self.tokenizer = ByteTokenizer()
        else:
            self.tokenizer = BPETokenizer(documents["train"], self.requested_vocab_size)
            if self.tokenizer.vocab_size != self.requested_vocab_size:  # the models are built for the request
                raise KdlabError(
                    f"data.vocab_size={self.requested_vocab_size}, but a BPE trained on this corpus's "
                    "training "
                    f"split stops at {self.tokenizer.vocab_size} tokens (it has no more pairs to merge). Set "
                    f"data.vocab_size={self.tokenizer.vocab_size} or less."
                )
        self.splits = {
            name: PackedText(*pack(docs, self.tokenizer, self.seq_len)) for name, docs in documents.items()
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        data = self.splits[split]
        if len(data) == 0:
            raise KdlabError(
                f"The {split} split of the corpus is empty: raise data.{split}_fraction or use a larger "
                "corpus."
            )
        # The training order is a function of (run seed, epoch), as the image data's (kdlab.data.base).
        sampler = EpochShuffle(data, run_seed()) if shuffle else None
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
