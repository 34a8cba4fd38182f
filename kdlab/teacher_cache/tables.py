"""The cache's tables: the teacher's outputs as stored on disk, memory-mapped back, looked up by sample.

An entry is a folder of raw tables (`<name>.bin`) and `entry.json`, written last, which says what
they hold: their shapes and dtypes, how the logits are stored, and for augmented data how many
views each sample has. Tables are read with `torch.from_file` (a private memory map): pages are
read from disk when a batch touches them, so an entry may be larger than memory, and processes on
one machine (DDP ranks, sweep jobs) share them through the page cache.

Logits are stored in one of two ways (`teacher_cache.logits`):
- `fp16`: every class's logit in half precision;
- `topk`: the k largest logits and their classes, plus one "fill" logit for the other C - k
  classes, as FKD stores soft labels (Shen & Xing, ECCV 2022, Sec. 3.3: the top-k probabilities,
  the rest of the mass spread uniformly). The fill is log(sum_{j not in top-k} exp z_j) - log(C - k),
  so that at T = 1 the decoded softmax has exactly the teacher's top-k probabilities and its tail
  mass; at other temperatures the tail is the uniform approximation.

A language model's logits are a row per position, `[T, V]` per sample (a window of text): each
position's logits are stored the same way, along the vocabulary (`positions`, the per-sample dims
before the classes).

With stored views, each table is [K, N, ...] (view-major: a view is computed and written as a
whole); without, [N, ...].
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdlab.errors import KdlabError
from kdlab.store import save_atomic
from kdlab.taps import Outputs

# Bumped when the stored layout changes, so old entries are not misread.
FORMAT = 2
# Written last: a folder without it is not a finished entry.
MARKER = "entry.json"
CODECS = ("fp16", "topk")
FEATURE_PREFIX = "feat."
DTYPES = {"float16": torch.float16, "int16": torch.int16, "int32": torch.int32}


def logit_tables(
    codec: str, classes: int, k: int | None, positions: tuple[int, ...] = ()
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tables one sample's logits take under `codec`: name -> (shape per sample, dtype). `positions`
    are the sample's dims before the classes (a language model's window: (T,))."""
    if codec == "fp16":
        return {"logits": ((*positions, classes), torch.float16)}
    index_dtype = torch.int16 if classes <= 2**15 else torch.int32
    return {
        "topk_values": ((*positions, k), torch.float16),
        "topk_index": ((*positions, k), index_dtype),
        "fill": (tuple(positions), torch.float16),
    }


def encode_logits(logits: Tensor, codec: str, k: int | None) -> dict[str, Tensor]:
    """The stored form of a batch of logits [B, ..., C] (see the module docstring)."""
    if codec == "fp16":
        return {"logits": logits.half()}
    z = logits.double()
    values, index = z.topk(k, dim=-1)
    tail = z.scatter(-1, index, float("-inf"))
    fill = torch.logsumexp(tail, dim=-1) - torch.log(torch.tensor(float(z.shape[-1] - k), dtype=z.dtype))
    index_dtype = torch.int16 if z.shape[-1] <= 2**15 else torch.int32
    return {"topk_values": values.half(), "topk_index": index.to(index_dtype), "fill": fill.half()}


def decode_logits(rows: Mapping[str, Tensor], codec: str, classes: int, dtype: torch.dtype) -> Tensor:
    """Logits [B, ..., C] as `dtype` from their stored form."""
    if codec == "fp16":
        return rows["logits"].to(dtype)
    fill = rows["fill"].to(dtype)
    full = fill.unsqueeze(-1).expand(*fill.shape, classes).clone()
    return full.scatter_(-1, rows["topk_index"].long(), rows["topk_values"].to(dtype))


class TeacherOutputs:
    """A cache entry's tables, looked up by a batch's sample indices (and, with views, its views).

    `tables` maps a table's name to a tensor [N, ...] or [K, N, ...] (`views` = K); the logits'
    tables follow `codec`, each feature is `feat.<layer>`. `live_layers` are the tapped layers that
    are not stored (over the budget): the scheme runs the teacher for those.
    """

    def __init__(
        self,
        tables: Mapping[str, Tensor],
        codec: str = "fp16",
        classes: int | None = None,
        views: int | None = None,
        live_layers: tuple[str, ...] = (),
    ):
        self.tables = dict(tables)
        self.codec = codec
        self.classes = classes if classes is not None else self.tables["logits"].shape[-1]
        self.views = views
        self.live_layers = tuple(live_layers)

    @property
    def layers(self) -> list[str]:
        return [name[len(FEATURE_PREFIX) :] for name in self.tables if name.startswith(FEATURE_PREFIX)]

    @property
    def nbytes(self) -> int:
        return sum(table.nbytes for name, table in self.tables.items() if name != "views")

    @property
    def device(self) -> torch.device:
        return next(iter(self.tables.values())).device

    def to(self, device: torch.device) -> TeacherOutputs:
        tables = {name: table.to(device) for name, table in self.tables.items() if name != "views"}
        return TeacherOutputs(tables, self.codec, self.classes, self.views, self.live_layers)

    def lookup(
        self, index: Tensor, dtype: torch.dtype = torch.float32, view: Tensor | None = None
    ) -> Outputs:
        """The stored outputs of samples `index` (in views `view`), on the index's device, as `dtype`."""
        rows: Any = index.to(self.device)
        if self.views is not None:
            if view is None:
                raise KdlabError(
                    "The cached teacher outputs hold one row per stored view of each sample, but the batch "
                    "does not say which view its images are. Serve training batches from the stored views "
                    "(the datamodule's serve_stored_views, whose batches carry 'view')."
                )
            rows = (view.to(self.device), rows)

        def take(table: Tensor) -> Tensor:
            return table[rows].to(index.device, non_blocking=True)

        logits = decode_logits(
            {
                name: take(table)
                for name, table in self.tables.items()
                if not name.startswith(FEATURE_PREFIX) and name != "views"
            },
            self.codec,
            self.classes,
            dtype,
        )
        feats = {layer: take(self.tables[FEATURE_PREFIX + layer]).to(dtype) for layer in self.layers}
        return Outputs(logits, feats)


class TableWriter:
    """Writes an entry's tables straight to disk (memory-mapped), under temporary names until `finish`."""

    def __init__(self, entry: Path):
        self.entry = Path(entry)
        self.tables: dict[str, Tensor] = {}
        self.layout: dict[str, dict[str, Any]] = {}

    def create(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A zeroed table of `shape` backed by a file: what is written into it lands on disk."""
        tmp = self._tmp(name)
        count = 1
        for size in shape:
            count *= int(size)
        try:
            with open(tmp, "wb") as file:  # made here, not by from_file, so it gets the usual permissions
                reserve(file, count * dtype.itemsize, self.entry)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        table = torch.from_file(str(tmp), shared=True, size=count, dtype=dtype).view(*shape)
        self.tables[name] = table
        self.layout[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        return table

    def finish(self, meta: Mapping[str, Any]) -> None:
        """Close the tables, give them their names, then write the marker that makes the entry whole."""
        self.tables.clear()  # unmaps: every write is in the page cache, hence in the files
        for name in self.layout:
            os.replace(self._tmp(name), self.entry / f"{name}.bin")
        document = {"format": FORMAT, **meta, "tables": self.layout}
        save_atomic(lambda p: p.write_text(json.dumps(document, indent=1)), self.entry / MARKER)

    def _tmp(self, name: str) -> Path:
        # The ".*.tmp" pattern kdlab.store.build_once removes after a killed build.
        return self.entry / f".{name}.bin.{os.getpid()}.tmp"


def reserve(file: Any, size: int, entry: Path) -> None:
    """Give `file` `size` bytes of disk now. A sparse file would fail later, when a write into the
    mapped table finds the disk full, and that kills the process with SIGBUS and no message."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(file.fileno(), 0, size)
        else:  # no fallocate (macOS, Windows): a sparse file, as before
            file.truncate(size)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(entry).free
        raise KdlabError(
            f"The teacher-output cache needs {size / 1e6:,.1f} MB more for a table in {entry}, and the disk "
            f"has {free / 1e6:,.1f} MB free. Free some space, put the cache elsewhere "
            "(teacher_cache.dir=<folder>), store fewer or smaller views (teacher_cache.views=<K>, "
            "teacher_cache.logits=topk), or train without it (teacher_cache.enabled=false)."
        ) from error


def read_entry(entry: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An entry's description and its tables, memory-mapped (KdlabError saying what to do if damaged)."""
    try:
        meta = json.loads((entry / MARKER).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"it is format {meta.get('format')}, this kdlab reads format {FORMAT}")
        tables = {}
        for name, layout in meta["tables"].items():
            shape = tuple(layout["shape"])
            count = 1
            for size in shape:
                count *= size
            path = entry / f"{name}.bin"
            dtype = DTYPES[layout["dtype"]]
            expected = count * dtype.itemsize
            if path.stat().st_size != expected:
                raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, not {expected}")
            tables[name] = torch.from_file(str(path), shared=False, size=count, dtype=dtype).view(*shape)
    except Exception as error:
        raise KdlabError(
            f"The cached teacher outputs in {entry} cannot be read ({error}). Delete the folder {entry} and "
            "rerun: the outputs are recomputed from the teacher."
        ) from None
    return meta, tables
