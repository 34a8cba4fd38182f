"""The command line's preflight: checks and rewrites `python -m kdlab.run ...` before Hydra runs it.

Hydra answers a misspelled key (`knowledge.kd.temprature=2`) with "To append to your config use
+knowledge.kd.temprature=2", advice that ends in a TypeError when the model is built. `preflight`
composes the config once, the way `@hydra.main` will (same search path, `--config-dir` and
`hydra.searchpath` included; each sweep at its first value), and when that fails on a key the config
does not have, raises a `KdlabError` that names the key, the nearest real key(s) of its node and the
override to type instead. Any other failure is left to Hydra, which reports it as before.

It also rewrites the command line Hydra gets:
- `-v` / `--verbose` becomes `verbose=true` (the full console output: kdlab/console.py);
- `teacher_training.trainer.<key>=v` and `teacher_training.optimizer.<key>=v` become `++...`, so any
  Trainer or optimizer argument can be set for the teacher alone without a `+`; a key that is not
  one (`teacher_training.trainer.max_epoch=3`) gets the same nearest-key error, against `trainer.*`.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra._internal.utils import (
    create_automatic_config_search_path,
    detect_calling_file_or_module_from_stack_frame,
    detect_calling_file_or_module_from_task_function,
    detect_task_name,
    get_args_parser,
    run_and_report,
)
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import DictConfig

from kdlab.errors import KdlabError
from kdlab.models.timm_models import register_choices
from kdlab.resume import finished_run, resumes_in_place

VERBOSE_FLAGS = ("-v", "--verbose")
# Hydra flags that compose nothing, or print and exit while their arguments are parsed.
NO_COMPOSE_FLAGS = ("--version", "--hydra-help", "--shell-completion", "-sc", "--experimental-rerun")
# Nodes whose keys are passed through to a constructor that takes more than the config lists:
# the teacher's own Trainer and optimizer arguments (kdlab/teachers.py merges them over these).
TEACHER_NODES = {"teacher_training.trainer": "trainer", "teacher_training.optimizer": "optimizer"}
SET_BY_KDLAB = ("params", "logger", "callbacks")
# What Hydra's composition raises for an override of a key the config does not have.
UNKNOWN_KEY = (
    re.compile(r"^Could not override '(?P<key>[^']+)'\."),
    re.compile(r"^Could not delete from config\. '(?P<key>[^']+)' does not exist\."),
)


def command_line(
    argv: list[str], task_function: Callable, config_path: str | None, config_name: str
) -> list[str]:
    """`preflight`, with a KdlabError reported as Hydra reports its own: the message, exit status 1."""
    return run_and_report(lambda: preflight(argv, task_function, config_path, config_name))


def preflight(
    argv: list[str], task_function: Callable, config_path: str | None, config_name: str
) -> list[str]:
    """The command line to hand to Hydra (`argv` rewritten); raises KdlabError for an unknown key.

    `task_function`, `config_path` and `config_name` are those given to `@hydra.main`, so that the
    config composed here is the one Hydra will compose.
    """
    tokens = argv[1:]
    verbose = any(token in VERBOSE_FLAGS for token in tokens)
    tokens = [token for token in tokens if token not in VERBOSE_FLAGS]
    if any(token in NO_COMPOSE_FLAGS for token in tokens):
        return [argv[0], *tokens]
    args = _parse_args(tokens)
    if args is None:  # not a command line Hydra accepts: Hydra says why
        return [argv[0], *tokens]
    register_choices(args.overrides)  # `model@student=timm/<name>`: a group option made on demand
    rewritten = [_teacher_override(line) for line in args.overrides]
    if verbose:
        rewritten.append("verbose=true")
    new_argv = [argv[0], *_replace_overrides(tokens, args.overrides, rewritten)]
    if rewritten and not args.help:  # no override, nothing misspelled: no composition to pay for
        cfg = _check(args, rewritten, task_function, config_path, config_name)
        if cfg is not None and not args.multirun and (notice := _finished(cfg)):
            # Before Hydra runs, which would rewrite the finished run's .hydra/ files and run.log.
            print(notice)
            raise SystemExit(0)
    return new_argv


def _finished(cfg: DictConfig) -> str | None:
    """What to say when `ckpt_path=last` (or auto) asks to resume a run that has finished (kdlab.resume)."""
    if not resumes_in_place(cfg):
        return None
    try:
        run_dir = Path(cfg.hydra.run.dir)
    except Exception:  # noqa: BLE001 - a run directory only Hydra can resolve: train() checks it then
        return None
    return finished_run(cfg, run_dir)


def _parse_args(tokens: list[str]) -> argparse.Namespace | None:
    parser = get_args_parser()

    def error(message: str):  # argparse would print the usage and exit; Hydra will do that
        raise ValueError(message)

    parser.error = error  # type: ignore[method-assign]
    try:
        args, extra = parser.parse_known_args(tokens)
    except (ValueError, argparse.ArgumentError):
        return None
    return None if extra else args


def _teacher_override(line: str) -> str:
    """`teacher_training.trainer.<key>=v` as `++...`: these nodes list only a few of the arguments."""
    key = line.split("=", 1)[0]
    if "=" in line and any(key.startswith(f"{node}.") for node in TEACHER_NODES):
        return f"++{line}"
    return line


def _replace_overrides(tokens: list[str], overrides: list[str], rewritten: list[str]) -> list[str]:
    """`tokens` with the overrides (in the order argparse found them) replaced by `rewritten`.

    The overrides stay one run of positional arguments, as Hydra's argument parser needs them; an
    extra override (`verbose=true`) goes after the last one, or before any flag if there is none.
    """
    out, pending = [], list(zip(overrides, rewritten, strict=False))
    last = None
    for token in tokens:
        if pending and token == pending[0][0]:
            out.append(pending.pop(0)[1])
            last = len(out)
        else:
            out.append(token)
    extra = rewritten[len(overrides) :]
    if not extra:
        return out
    at = last if last is not None else 0
    return [*out[:at], *extra, *out[at:]]


def _check(
    args: argparse.Namespace,
    overrides: list[str],
    task_function: Callable,
    config_path: str | None,
    config_name: str,
) -> DictConfig | None:
    """Compose the config as Hydra will; raise KdlabError only for keys that do not exist.

    Returns the composed config (None when Hydra will report a problem itself)."""
    try:
        hydra = _hydra(args, task_function, config_path)
        parser = OverridesParser.create(config_loader=hydra.config_loader)
        parsed = parser.parse_overrides(overrides)
        composed = [_first_of_sweep(override) for override in parsed]
    except Exception:  # a search path or override Hydra will refuse itself
        return None
    config_name = args.config_name or config_name
    mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN

    def compose(lines: list[str]) -> DictConfig:
        return hydra.compose_config(config_name, lines, run_mode=mode, validate_sweep_overrides=False)

    problems: list[tuple[str, str]] = []  # (typed override, the key the config lacks)
    remaining = list(zip(parsed, composed, strict=True))
    for _ in range(len(remaining) + 1):
        try:
            cfg = compose([line for _, line in remaining])
            break
        except ConfigCompositionException as error:
            key = _unknown_key(error)
            failing = next((pair for pair in remaining if pair[0].key_or_group == key), None)
            if key is None or failing is None:
                return None
            problems.append((_typed(failing[0]), key))
            remaining.remove(failing)
        except Exception:  # Hydra reports everything else, as before
            return None
    else:
        return None
    problems += _teacher_problems(cfg, parsed)
    # Problems this cannot explain (not a misspelling) are left to Hydra's message.
    messages = [message for typed, key in problems if (message := _explain(cfg, typed, key))]
    if messages:
        raise KdlabError(" ".join(messages))
    return None if problems else cfg


def _hydra(args: argparse.Namespace, task_function: Callable, config_path: str | None) -> Hydra:
    """A Hydra instance with the search path `@hydra.main` builds (kept out of GlobalHydra)."""
    if args.config_path is not None:
        config_path = args.config_path
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task_function)
    if calling_file is None and calling_module is None:
        calling_file, calling_module = detect_calling_file_or_module_from_stack_frame(3)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_path)
    if args.config_dir is not None:
        config_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(config_dir):
            raise FileNotFoundError(config_dir)
        search_path.prepend("command-line", f"file://{config_dir}", anchor=SearchPathQuery(provider="schema"))
    loader = ConfigLoaderImpl(config_search_path=search_path)
    return Hydra(task_name=detect_task_name(calling_file, calling_module), config_loader=loader)


def _first_of_sweep(override: Override) -> str:
    """The override with a sweep (`1,2,4`, `range(...)`, `glob(*)`, `interval(a,b)`) at one value."""
    if not override.is_sweep_override():
        return override.input_line
    if override.is_interval_sweep():
        value = str(override.value().start)
    else:
        value = next(iter(override.sweep_string_iterator()), "null")
    return f"{override.get_key_element()}={value}"


def _unknown_key(error: ConfigCompositionException) -> str | None:
    for pattern in UNKNOWN_KEY:
        if match := pattern.match(str(error)):
            return match["key"]
    return None


def _typed(override: Override) -> str:
    """The override as the user typed it (without the `++` this module added)."""
    line = override.input_line or ""
    key = line.split("=", 1)[0]
    if line.startswith("++") and any(key[2:].startswith(f"{node}.") for node in TEACHER_NODES):
        return line[2:]
    return line


def _teacher_problems(cfg: DictConfig, parsed: list[Override]) -> list[tuple[str, str]]:
    """Keys of `teacher_training.trainer/optimizer` that are no Trainer / optimizer argument."""
    problems = []
    typed = {override.key_or_group: _typed(override) for override in parsed}
    for node, reference in TEACHER_NODES.items():
        teacher, known = _select(cfg, node), _select(cfg, reference)
        if not isinstance(teacher, DictConfig) or not isinstance(known, DictConfig):
            continue
        unknown = [key for key in teacher.keys() if key not in known and key != "_target_"]
        if unknown:  # maybe an argument the config does not list (imported only in this case)
            accepted = _parameters(teacher.get("_target_") or known.get("_target_"))
            unknown = [key for key in unknown if key not in accepted]
        for key in unknown:
            full = f"{node}.{key}"
            problems.append((typed.get(full, full), full))
    return problems


def _explain(cfg: DictConfig, typed: str, key: str) -> str | None:
    """A few sentences on `key` (from the override `typed`), or None if it is no misspelling."""
    parts = key.split(".")
    if parts[0] == "hydra":
        return None  # Hydra's own config: its message names the node's type
    value = typed.split("=", 1)[1] if "=" in typed else None
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        node = cfg if depth == 0 else _select(cfg, parent)
        if parent in TEACHER_NODES:  # the teacher's own Trainer / optimizer arguments
            reference = TEACHER_NODES[parent]
            known = _select(cfg, reference)
            names = [*_keys(known), *_parameters(known.get("_target_"))]
            # Not the ones kdlab sets itself (the parameters, logger, callbacks) or Hydra's.
            names = [n for n in dict.fromkeys(names) if n not in SET_BY_KDLAB and not n.startswith("_")]
            what = f"`{part}` is not an argument of `{reference}` ({known.get('_target_')})"
            return _unknown(cfg, typed, parts, depth, value, names, what, "Its arguments are")
        if not isinstance(node, DictConfig):
            return None  # a key below a value (`trainer.max_epochs.x`): Hydra's message says so
        if part in node.keys():
            continue
        target = node.get("_target_")
        if depth == len(parts) - 1 and part in _parameters(target):
            add = f"+{key}={value}" if value is not None else f"+{key}"
            listed = f"{typed}: `{parent}` ({target}) takes `{part}`, but the config does not list it"
            return f"{listed}: {add} adds it."
        if parent:
            what, listed = f"the config node `{parent}` has no key `{part}`", f"The keys of `{parent}` are"
        else:
            what, listed = f"there is no top-level key `{part}`", "The top-level keys are"
        return _unknown(cfg, typed, parts, depth, value, _keys(node), what, listed)
    return None  # the key exists: not a misspelling


def _unknown(
    cfg: DictConfig,
    typed: str,
    parts: list[str],
    depth: int,
    value: str | None,
    names: list[str],
    what: str,
    listed: str,
) -> str:
    """The message for `parts[depth]`, not one of `names`: the nearest full overrides, and `names`."""
    prefix = "~" if typed.startswith("~") else ""
    options = []
    for name in _nearest(parts[depth], names):
        if (path := _corrected(cfg, [*parts[:depth], name], parts[depth + 1 :])) is not None:
            options.append(prefix + ".".join(path) + (f"={value}" if value is not None else ""))
    text = f"{typed}: {'nothing to delete, ' if prefix else ''}{what}."
    if options:
        others = f" (or {', '.join(options[1:])})" if options[1:] else ""
        text += f" Did you mean {options[0]}{others}?"
    return f"{text} {listed}: {', '.join(names)}."


def _corrected(cfg: DictConfig, path: list[str], rest: list[str]) -> list[str] | None:
    """`path + rest` with each segment of `rest` the config lacks replaced by its nearest key."""
    for part in rest:
        node = _select(cfg, ".".join(path))
        if not isinstance(node, DictConfig):
            return None
        keys = _keys(node)
        nearest = [part] if part in keys else _nearest(part, keys)
        if not nearest:
            return None
        path = [*path, nearest[0]]
    return path


def _nearest(name: str, keys: list[str]) -> list[str]:
    """Up to 3 keys like `name`: by spelling (difflib), initials (learning_rate: lr), prefix (batch)."""
    initials = lambda key: "".join(word[:1] for word in key.split("_") if word)  # noqa: E731
    found = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    found += [k for k in keys if "_" in name + k and (initials(k) == name or initials(name) == k)]
    found += [k for k in keys if k.startswith(f"{name}_") or name.startswith(f"{k}_")]
    return list(dict.fromkeys(found))[:3]


def _keys(node: Any) -> list[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return None
        node = node.get(part)
    return node


def _parameters(target: Any) -> Iterable[str]:
    """The keyword arguments `target` (a `_target_` path) takes; empty if it cannot be imported."""
    if not isinstance(target, str):
        return ()
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except Exception:  # no parameters to offer
        return ()
    return [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
