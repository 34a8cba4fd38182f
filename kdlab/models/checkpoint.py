"""Load saved weights into a freshly built model, with errors that say how to fix a bad checkpoint.

Accepted files: a plain `state_dict`, or any dict holding one under `"state_dict"` (kdlab's
teacher store and Lightning checkpoints, see
https://lightning.ai/docs/pytorch/stable/common/checkpointing_basic.html). A Lightning module
keeps the network as an attribute, so its keys carry a prefix such as `student.`, `teacher.`
or `model.`; the prefix under which the keys best match the model is stripped and everything
else (the other networks, loss heads) is ignored. Files are read with `weights_only=True`, so
a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdlab.errors import KdlabError

log = logging.getLogger(__name__)

# On a tie, prefer no prefix, then the trained network of a distillation run, then a wrapper.
_PREFERRED_PREFIXES = ("", "student.", "model.")
_SHOWN = 5


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the weights in `path` into `model` strictly (every key and shape must match)."""
    path = Path(path).expanduser()
    state = _extract_state_dict(_read(path), path)
    own = model.state_dict()
    prefix = _best_prefix(state, own.keys())
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix:
        log.info("Loading %s: using the weights stored under prefix '%s'", path, prefix)
    _check_compatible(picked, own, path, prefix)
    model.load_state_dict(picked, strict=True)


def _read(path: Path) -> object:
    if not path.is_file():
        raise KdlabError(
            f"Checkpoint file '{path}' does not exist (resolved from the working directory "
            f"'{Path.cwd()}'). Check the path, use an absolute path, or train the model first so the "
            "file is written."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if blocked:
            # A valid file that pickles a class weights_only refuses, e.g. an OmegaConf config saved
            # among a Lightning module's hyper-parameters.
            raise KdlabError(
                f"'{path}' is a torch checkpoint, but it stores a {blocked.group(1)} object, which kdlab "
                "refuses to unpickle (checkpoints are loaded with weights_only=True so that loading cannot "
                "run code). Re-save it with only tensors and plain Python containers, e.g. "
                "torch.save({'state_dict': model.state_dict()}, path), or convert configs to plain dicts "
                "(OmegaConf.to_container) before they are saved as hyper-parameters."
            ) from exc
        reason = type(exc).__name__
        first_line = str(exc).strip().split("\n")[0]
        # torch's weights-only text suggests weights_only=False, which is wrong advice for a broken file.
        if first_line and not first_line.startswith("Weights only load failed"):
            reason += f": {first_line}"
        raise KdlabError(
            f"Could not read '{path}' as a PyTorch checkpoint ({reason}). The file "
            "may be truncated, corrupt, or not a checkpoint at all; it must be written by torch.save. "
            "Re-create it by re-running the training that produced it, or point to another file."
        ) from exc


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and obj.get("deployed") is True:
        raise KdlabError(
            f"'{path}' holds a deployed student ({obj.get('architecture')}): the student's backbone "
            "with parts of its distillation method (SimKD's projector and the teacher's classifier), so "
            "it is not the weights of one architecture, and its own classifier was never trained. "
            "Evaluate it as saved (torch.load and kdlab.knowledge.simkd.SimKDStudent), or use the "
            "student of a method that trains its classifier."
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise KdlabError(
            f"'{path}' is a readable torch file but holds a {type(obj).__name__}, not a state_dict (a dict "
            "of parameter names to tensors) or a dict with a 'state_dict' entry. Save weights with "
            "torch.save(model.state_dict(), path), or point to a Lightning/kdlab checkpoint."
        )
    return dict(obj)


def _best_prefix(state: Mapping[str, object], own_keys) -> str:
    """The key prefix (possibly '') under which the most file keys are model keys."""
    own = set(own_keys)
    # Try every dotted head of every key ("", "student.", "student.layer1.", ...) as the prefix and
    # count, per prefix, the keys whose remainder is a model key.
    scores: Counter[str] = Counter({"": 0})
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            prefix = "".join(part + "." for part in parts[:i])
            if key[len(prefix) :] in own:
                scores[prefix] += 1
    candidates = list(scores)

    def rank(prefix: str) -> tuple:
        preferred = (
            _PREFERRED_PREFIXES.index(prefix) if prefix in _PREFERRED_PREFIXES else len(_PREFERRED_PREFIXES)
        )
        return (-scores[prefix], preferred, len(prefix), prefix)

    best = min(candidates, key=rank)
    tied = sorted(p for p in candidates if scores[p] == scores[best])
    if scores[best] > 0 and len(tied) > 1:
        log.warning(
            "Several key prefixes in the checkpoint match the model equally well (%s); using '%s'.",
            ", ".join(f"'{p}'" for p in tied),
            best,
        )
    return best


def _check_compatible(
    picked: Mapping[str, object], own: Mapping[str, torch.Tensor], path: Path, prefix: str
) -> None:
    # Keep state_dict order (not alphabetical) so the first few names shown span whole layers.
    missing = [k for k in own if k not in picked]
    unexpected = [k for k in picked if k not in own]
    mismatched = [
        f"{k} (checkpoint {_shape(v)} vs model {tuple(own[k].shape)})"
        for k, v in picked.items()
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    where = f" (keys under prefix '{prefix}')" if prefix else ""
    problems = [
        _describe("missing from the checkpoint", missing),
        _describe("unexpected in the checkpoint", unexpected),
        _describe("with a different shape", mismatched),
    ]
    raise KdlabError(
        f"The weights in '{path}'{where} do not fit the model that was built: "
        + "; ".join(p for p in problems if p)
        + ". The checkpoint was made by a different architecture or configuration. Build the model "
        "that made it: set the model name to the one it was trained with (for example "
        "`teacher.name=...` on the command line) and the same num_classes, in_channels and input_size "
        "(a shape mismatch only in the last layer usually means a different num_classes)."
    )


def _describe(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} key(s) {what}: {', '.join(keys[:_SHOWN])}{more}"


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
