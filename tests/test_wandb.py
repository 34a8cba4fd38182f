"""A real offline W&B run, read back from its files: the metrics, the summary and the plots are in it.

What wandb 0.31 writes offline, under `<run dir>/wandb/offline-run-<time>-<id>/`:
- `run-<id>.wandb`: the transaction log. Every history row, summary update, config, tag and
  uploaded file is a `wandb_internal_pb2.Record` in it; this is what `wandb sync` replays.
- `files/media/images/...png` and `files/media/table/...table.json`: the logged media.
- `files/output.log`, `files/requirements.txt`. There is no `wandb-summary.json` nor
  `config.yaml` offline: the summary lives in the log's summary records only.

wandb 0.31 has no Python reader for the log any more (its `DataStore` moved into the Go core), so
`records` below reads the container: the LevelDB log format (32 KiB blocks of records, each with a
7-byte header: CRC-32 of type and payload, little-endian length, type), after wandb's 7-byte file
header. The payloads are parsed with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = b":W&B"
FILE_HEADER_SIZE = 7  # ":W&B", a 2-byte magic number, a 1-byte version
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, payload length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("soft_targets", "confusion_matrices", "per_class_accuracy", "agreement")


def records(path: Path) -> Iterator[pb.Record]:
    """Every record of a `.wandb` transaction log, in order, each checked against its CRC."""
    data = path.read_bytes()
    assert data.startswith(FILE_HEADER), f"{path} is not a W&B transaction log"
    position, payload = FILE_HEADER_SIZE, b""
    while position + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, position)
        if kind == 0:  # zero-filled padding up to the next block
            position += left_in_block
            continue
        chunk = data[position + RECORD_HEADER.size : position + RECORD_HEADER.size + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt record at byte {position} of {path}"
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        position += RECORD_HEADER.size + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record
    assert position == len(data), f"{path} ends inside a record"


def as_dict(items) -> dict:
    """History or summary items (each a key path and a JSON value) as a nested dict."""
    result: dict = {}
    for item in items:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = result
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = json.loads(item.value_json)
    return result


@pytest.fixture(scope="module")
def offline_wandb_run(cli_wandb_job):
    """The shared CLI job of two epochs with `logger=[csv,wandb]`, WANDB_MODE=offline (tests/conftest.py):
    its run dir and W&B dir."""
    _, run_dir = cli_wandb_job
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    return run_dir, wandb_dir


def test_offline_run_holds_the_history_and_the_summary(offline_wandb_run):
    run_dir, wandb_dir = offline_wandb_run
    (log,) = wandb_dir.glob("run-*.wandb")
    log_records = list(records(log))
    history = [as_dict(r.history.item) for r in log_records if r.HasField("history")]
    summary: dict = {}
    for record in log_records:
        if record.HasField("summary"):
            summary.update(as_dict(record.summary.update))

    def per_epoch(name: str) -> list[int]:
        return [row["epoch"] for row in history if name in row]

    for name in ("val/student/top1", "val/student/agreement", "train/kd_epoch", "train/loss_epoch"):
        assert per_epoch(name) == [0, 1], name

    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for name in ("test/student/top1", "test/teacher/top1", "test/student/agreement"):
        assert summary[name] == pytest.approx(metrics[name]), name
    assert summary["results"]["_type"] == "table-file" and summary["results"]["nrows"] == 2
    table = json.loads((wandb_dir / "files" / summary["results"]["path"]).read_text())
    assert [row[0] for row in table["data"]] == ["teacher", "student"]

    tags = next(r.run.tags for r in log_records if r.HasField("run"))
    assert {"mode:offline", "knowledge:kd"} <= set(tags)


def test_offline_run_holds_the_plots(offline_wandb_run):
    run_dir, wandb_dir = offline_wandb_run
    logged = {}
    for record in records(next(wandb_dir.glob("run-*.wandb"))):
        if record.HasField("history"):
            row = as_dict(record.history.item)
            logged.update({k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("plots/")})
    assert set(logged) == set(PLOTS)
    for name, image in logged.items():
        assert image["_type"] == "images/separated" and image["format"] == "png"
        (filename,) = image["filenames"]
        media = wandb_dir / "files" / filename
        assert media.read_bytes() == (run_dir / "plots" / f"{name}.png").read_bytes(), name
        assert media.read_bytes().startswith(PNG_SIGNATURE)
