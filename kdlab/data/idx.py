"""Read IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order. We read
only unsigned bytes (type code 0x08), the one type these datasets use, and check every
field so a damaged file is reported by name instead of producing garbage tensors.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import torch

from kdlab.errors import KdlabError

UNSIGNED_BYTE = 0x08
# Sniffing the content rather than trusting the ".gz" suffix lets a renamed file still load.
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """Return the uint8 tensor stored in the IDX file `path`, which must have `ndim` dims."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise _corrupt(path, "it does not start with the IDX magic number (two zero bytes)")
    type_code, file_ndim = raw[2], raw[3]
    if type_code != UNSIGNED_BYTE:
        raise _corrupt(path, f"its IDX type code is 0x{type_code:02x}, expected 0x08 (unsigned byte)")
    if file_ndim != ndim:
        raise _corrupt(path, f"it has {file_ndim} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, "it ends inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise _corrupt(
            path, f"its header promises shape {tuple(shape)} ({expected} bytes) but it has {len(raw)} bytes"
        )
    # bytearray gives torch a writable buffer, avoiding its warning about read-only memory.
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; EOFError means the archive was cut short.
        raise _corrupt(path, f"it could not be read or decompressed ({e})") from e
    return raw


def _corrupt(path: Path, why: str) -> KdlabError:
    return KdlabError(
        f"The IDX data file {path} is damaged: {why}. Delete it and fetch it again (re-download, "
        f"or reinstall the package that provided it), then rerun."
    )
