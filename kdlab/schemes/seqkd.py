"""Sequence-level knowledge distillation for language models (`mode=seqkd`): the student learns the
teacher's own text.

Kim and Rush 2016, "Sequence-Level Knowledge Distillation" (EMNLP), Sec. 3.2 (Eq. 4-5): instead of the
data's continuation y of a source x, the student is trained with cross-entropy on ŷ, the teacher's decoded
output for x (beam search in the paper; here greedy decoding, its beam size 1, or sampling). For a
corpus without sources, x is the first `prompt_tokens` tokens of each training window and ŷ the teacher's
continuation of it to the window's length. The loss counts the continuation only (the prompt's labels
are -100). Knowledge terms may be added (Kim and Rush's Seq-KD + Word-KD: `knowledge=response`), and
they then read the teacher on ŷ as well.

The teacher's text is kept in the teacher store beside the teacher (`<store>/generations/`), keyed by the
teacher's weights, the corpus and the decoding settings. A window is decoded the first time a batch needs
it and stored then, so a run pays for the windows it trains on (a short run does not decode the whole
split), and every later run with these settings (another seed, another student) reads them. Validation
and test stay on the data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.resume import teacher_identity
from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.offline import Offline
from kdlab.schemes.on_policy import check_generation, continuation_batch
from kdlab.store import build_once, content_key, save_atomic

log = logging.getLogger(__name__)

MARKER = "layout.json"  # written last: the tables exist and have this layout
DECODINGS = ("greedy", "sample")


class TeacherText:
    """The teacher's text for each training window, memory-mapped from the store: `text` `[N, T]` token ids
    and `decoded` `[N]`, which windows hold it. Processes sharing the entry (a sweep's jobs, DDP ranks) see
    each other's writes; two that decode one window write the same text (greedy), or one of two samples."""

    def __init__(self, entry: Path, windows: int, length: int):
        def create(folder: Path) -> None:
            for name, count, dtype in (
                ("text", windows * length, torch.int32),
                ("decoded", windows, torch.uint8),
            ):
                torch.zeros(count, dtype=dtype).numpy().tofile(folder / f"{name}.bin")
            layout = {"windows": windows, "length": length}
            save_atomic(lambda p: p.write_text(json.dumps(layout)), folder / MARKER)

        build_once(entry, MARKER, create, f"creating the teacher's text store {entry}")
        layout = json.loads((entry / MARKER).read_text())
        if (layout["windows"], layout["length"]) != (windows, length):
            raise KdlabError(
                f"The teacher's text in {entry} has {layout['windows']} windows of {layout['length']} "
                f"tokens, but the training split has {windows} of {length}. Delete {entry} and rerun."
            )
        self.entry = entry
        text = torch.from_file(str(entry / "text.bin"), shared=True, size=windows * length, dtype=torch.int32)
        self.text = text.view(windows, length)
        self.decoded = torch.from_file(
            str(entry / "decoded.bin"), shared=True, size=windows, dtype=torch.uint8
        )

    def missing(self, index: Tensor) -> Tensor:
        """Which of the windows `index` have no text yet (booleans)."""
        return self.decoded[index] == 0

    def store(self, index: Tensor, sequences: Tensor) -> None:
        self.text[index] = sequences.to(torch.int32)
        self.decoded[index] = 1  # after the text: a window marked decoded always has it

    def read(self, index: Tensor) -> Tensor:
        return self.text[index].long()


class SeqKD(Offline):
    """The student trains on the teacher's continuations of the training windows (see the module's doc)."""

    name = "seqkd"
    tasks = ("lm",)

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """The frozen teacher (as mode=offline's), and the store of its continuations of the windows."""
        mode = cfg.mode
        check_settings(mode.prompt_tokens, mode.decoding, mode.temperature, datamodule)
        sources = super().sources_for(cfg, datamodule, store)
        teacher = sources.modules["teacher"]
        spec = {
            "teacher": teacher_identity(sources.frozen, teacher, cfg.teacher.name)["sha256"],
            "corpus": datamodule.corpus_key(),
            "prompt_tokens": mode.prompt_tokens,
            "decoding": mode.decoding,
            "temperature": mode.temperature if mode.decoding == "sample" else None,
            "seed": mode.decoding_seed if mode.decoding == "sample" else None,
        }
        name = f"{cfg.teacher.name}-{content_key(spec)}"
        entry = Path(cfg.teacher_training.store).expanduser() / "generations" / name
        datamodule.setup()
        windows = datamodule.splits["train"].inputs
        text = TeacherText(entry, len(windows), windows.shape[1])
        done = int((text.decoded == 1).sum())
        log.info(
            "SeqKD: the teacher's text in %s (%d of %d windows decoded so far)", entry, done, len(windows)
        )
        sources.modules["teacher_text"] = text
        return sources

    def __init__(
        self,
        *args,
        teacher_text: TeacherText,
        prompt_tokens: int = 16,
        decoding: str = "greedy",
        temperature: float = 1.0,
        decoding_seed: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher_text = teacher_text  # data, not model state: it stays out of checkpoints
        self.prompt_tokens, self.decoding = prompt_tokens, decoding
        self.temperature, self.decoding_seed = float(temperature), int(decoding_seed)

    @torch.no_grad()
    def teacher_batch(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The batch with each window replaced by the teacher's continuation of its prompt (decoded now
        for the windows that have none yet)."""
        index = batch["index"].cpu()
        missing = self.teacher_text.missing(index)
        if bool(missing.any()):
            prompts = batch["input"][missing.to(batch["input"].device), : self.prompt_tokens]
            new = batch["input"].shape[1] - self.prompt_tokens
            # Seeded by the batch's first window: a sample does not move the run's random state.
            with torch.random.fork_rng(devices=[prompts.device] if prompts.device.type == "cuda" else []):
                torch.manual_seed(self.decoding_seed * 1_000_003 + int(index[0]))
                sequences = self.teacher.sample(
                    prompts, new, temperature=self.temperature, greedy=self.decoding == "greedy"
                )
            self.teacher_text.store(index[missing], sequences.cpu())
        sequences = self.teacher_text.read(index).to(batch["input"].device)
        return {**batch, **continuation_batch(sequences, self.prompt_tokens)}

    def sources(self, x: Tensor, batch: Mapping[str, Tensor]):
        if not self.knowledge:  # Seq-KD alone learns from the text: the teacher need not run on it
            return None
        return super().sources(x, batch)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return super().training_step(self.teacher_batch(batch), batch_idx)


def check_settings(prompt_tokens: int, decoding: str, temperature: float, datamodule) -> None:
    """mode=seqkd's options, checked before a teacher is obtained (KdlabError naming the key)."""
    seq_len = getattr(datamodule, "seq_len", None)
    if seq_len is None:
        raise KdlabError("mode=seqkd trains on a teacher's generated text: use it with task=lm.")
    check_generation(prompt_tokens, temperature, seq_len)
    if decoding not in DECODINGS:
        raise KdlabError(
            f"mode.decoding={decoding!r} is not one kdlab does: greedy (the most likely token, Kim and "
            "Rush's beam search with one beam) or sample (at mode.temperature)."
        )
