"""Training throughput of kdlab against hand-written PyTorch, side by side in one process.

    .venv/bin/python scripts/bench.py                 # the README's figures
    .venv/bin/python scripts/bench.py --batches 20 --repeats 1   # a quick look

Every variant trains the same models (the PyTorch KD tutorial's DeepNN teacher and LightNN
student, kdlab's `deepnn`/`lightnn`) on real Fashion-MNIST without augmentation, with the same
batch size, optimizer (Adam, lr 1e-3), threads and glibc malloc setting, and is timed over the
same number of batches after the same warm-up:

  (a) a hand-written PyTorch KD loop: teacher forward under no_grad, Hinton KD + CE, Adam;
  (b) kdlab offline KD (`mode=offline knowledge=kd`), the teacher run every step;
  (c) kdlab offline KD with the teacher-output cache (built once first; its time is shown apart);
  (d) hand-written student cross-entropy training alone;
  (e) kdlab online DML with the two models as peers, against the sum of their hand-written
      cross-entropy steps;
  (f) kdlab offline KD on augmented data (Fashion-MNIST's usual RandomCrop(28, padding=2) + flip),
      the teacher served from the cache's stored views (`--views` per sample, built once first);
  (g) hand-written student cross-entropy on the same augmented data, read through the same data
      module's loader with the augmentation drawn live, as a PyTorch user's loop reads it.
Also (f) against kdlab's live teacher on the same augmented data, and against the hand-written
loop reading the stored views' loader; the build's seconds, and how many runs of K epochs it takes
to pay for itself (`break_even_runs`).

The hand-written loops (but g's) read batches by slicing a shuffled, pre-normalised tensor, the
cheapest data path there is; kdlab uses its own DataModule. kdlab runs with `logger=none`, no progress
bar, no checkpoints and no validation, so what is compared is the training step itself. The
variants are interleaved `--repeats` times and each one's best kept, as `timeit` does: other load
on the machine only slows a run down. Also shown: the teacher's forward in channels_last against the default
layout, and (`--allocator`, in two fresh processes) loop (a) with glibc's default malloc against
kdlab's tuning (kdlab/allocator.py).

`--precision bf16-mixed` runs every variant in bf16 autocast: kdlab's as `trainer.precision=bf16-mixed`,
the hand-written loops with their forward pass and loss under `torch.autocast`, as Lightning does.
`--compile-teacher` compiles the frozen teacher of the KD variants: kdlab's offline ones with
`mode.teacher_compile=true`, loop (a) with `Module.compile`; it compiles in the warm-up batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from kdlab.allocator import tune_malloc  # noqa: E402
from kdlab.build import (  # noqa: E402
    build_knowledge,
    build_model,
    build_scheme,
    build_trainer,
    instantiate,
    scheme_class,
)
from kdlab.cuda_probe import drop_failing_nvml_probe  # noqa: E402
from kdlab.resume import teacher_identity  # noqa: E402
from kdlab.teacher_cache import MARKER, cache_callback, load_or_build, plan  # noqa: E402
from kdlab.teachers import TeacherStore  # noqa: E402

GOALS = {"b/a": ("offline KD vs hand-written KD", ">=", 0.95), "c/d": ("cached KD vs student CE", ">=", 0.95)}
GOALS["kdlab_baseline/d"] = ("kdlab's own student CE vs hand-written", ">=", 0.95)
GOALS["e/(ce_t+ce_s)"] = ("online DML vs the peers' CE steps", "<=", 1.05)
GOALS["f/g"] = ("cached KD on stored views vs CE with live augmentation", ">=", 0.85)
EXTRA_RATIOS = {
    "c/b": "speed-up of the cache",
    "channels_last": "teacher forward, channels_last vs contiguous",
    "f/b_aug": "speed-up of stored views on augmented data",
    "f/g_views": "cached KD vs CE, both reading the stored views",
}
AUGMENTED = ["data.train_transforms=null"]  # the dataset's usual augmentation


# ---------------------------------------------------------------------------------- setup
def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "~experiment",
        "data.train_transforms=[]",
        f"data.batch_size={args.batch_size}",
        "optimizer.lr=0.001",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=1",
        f"trainer.precision={args.precision}",
        f"trainer.limit_train_batches={args.warmup + args.batches}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.enable_checkpointing=false",
        "trainer.accelerator=cpu" if args.cpu else "trainer.accelerator=auto",
        f"data.root={args.data_root}" if args.data_root else "data.root=null",
        f"data.val_size={args.val_size}",
        f"paths.output_dir={args.workdir / 'run'}",
        f"paths.teacher_store={args.workdir / 'teachers'}",
        f"teacher.checkpoint={teacher_file(args)}",
        "hydra.run.dir=.",
    ]


def seeded_model(cfg, role: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same weights in every variant, hand-written or kdlab
    return build_model(cfg[role], checkpoint=None)


class Throughput(L.Callback):
    """Images per second over the batches after `warmup`, from the start of one to the end of the last."""

    def __init__(self, warmup: int, batch_size: int):
        self.warmup, self.batch_size = warmup, batch_size
        self.start = self.end = None
        self.count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            synchronize()
            self.end, self.count = time.perf_counter(), batch_idx - self.warmup + 1

    @property
    def rate(self) -> float:
        return self.count * self.batch_size / (self.end - self.start)


# Asked once: the timers synchronise at every batch, and the check itself can cost 0.4 ms (kdlab.cuda_probe).
CUDA = torch.cuda.is_available()


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ kdlab runs
def write_seeded_teacher(args) -> None:
    """The teacher every variant uses (`teacher.checkpoint`): the seeded initialisation, so kdlab's
    schemes obtain it as a user's run does (`sources_for`), with the hand-written loops' weights."""
    cfg = compose_cfg([o for o in common_overrides(args) if not o.startswith("teacher.checkpoint")])
    torch.save({"state_dict": seeded_model(cfg, "teacher", 0).state_dict()}, teacher_file(args))


def teacher_file(args) -> Path:
    return args.workdir / "seeded_teacher.pt"


def kdlab_scheme(args, datamodule, overrides: list[str]):
    """The scheme of `overrides` with its sources, obtained the way kdlab.run obtains them."""
    cfg = compose_cfg([*common_overrides(args), *overrides])
    knowledge = build_knowledge(cfg)
    sources = scheme_class(cfg).sources_for(cfg, datamodule, TeacherStore(cfg.teacher_training.store))
    torch.manual_seed(1)
    return cfg, sources, build_scheme(cfg, datamodule, knowledge, sources.modules)


def kdlab_rate(args, datamodule, overrides: list[str], cached: bool = False) -> float:
    cfg, sources, scheme = kdlab_scheme(args, datamodule, overrides)
    timer = Throughput(args.warmup, args.batch_size)
    callbacks = [timer]
    if cached:
        weights = teacher_identity(sources.frozen, sources.modules["teacher"], cfg.teacher.name)["sha256"]
        callbacks.append(cache_callback(cfg, scheme, datamodule, weights, sources.frozen_config))
    trainer = build_trainer(cfg, logger=False, callbacks=callbacks)
    trainer.fit(scheme, datamodule=datamodule)
    datamodule.trainer = None
    return timer.rate


def build_cache(args, datamodule, overrides: list[str] = ()) -> float:
    """Build the cache entry a cached variant reads, once; returns the seconds it took (0 when it existed)."""
    start = time.perf_counter()
    cfg, sources, scheme = kdlab_scheme(
        args, datamodule, ["teacher_cache.enabled=true", "trainer.limit_train_batches=1", *overrides]
    )
    weights = teacher_identity(sources.frozen, sources.modules["teacher"], cfg.teacher.name)["sha256"]
    cache = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    existed = (cache.entry / MARKER).exists()
    forward = scheme.to(device(args)).teacher_forward
    load_or_build(cache.entry, cache.layout, forward, datamodule, device(args), args.batch_size)
    return 0.0 if existed else time.perf_counter() - start


def augmented_datamodule(args):
    datamodule = instantiate(compose_cfg([*common_overrides(args), *AUGMENTED]).data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def device(args) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def teacher_options(args) -> list[str]:
    """The overrides of kdlab's offline KD variants for `--compile-teacher`."""
    return ["mode.teacher_compile=true"] if args.compile_teacher else []


def autocast(args, dev: torch.device):
    """The hand-written loops' `--precision`: bf16 autocast of the forward pass and loss, as Lightning's."""
    if args.precision == "bf16-mixed":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------ hand-written loops
class Batches:
    """Shuffled batches sliced from pre-normalised tensors on the device: the cheapest data path."""

    def __init__(self, datamodule, batch_size: int, dev: torch.device):
        view = datamodule.train_set.dataset
        indices = list(datamodule.train_set.indices)
        batch = view.__getitems__(indices)
        self.x, self.y = batch["input"].to(dev), batch["target"].to(dev)
        self.batch_size = batch_size
        self.order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(0)).to(dev)

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[rows], self.y[rows]


def timed(step, args) -> float:
    for i in range(args.warmup):
        step(i)
    synchronize()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.batches):
        step(i)
    synchronize()
    return args.batches * args.batch_size / (time.perf_counter() - start)


def handwritten_kd(args, batches: Batches, cfg) -> float:
    dev = batches.x.device
    teacher = seeded_model(cfg, "teacher", 0).to(dev).eval().requires_grad_(False)
    if args.compile_teacher:
        teacher.compile()
    torch.manual_seed(1)
    student = build_model(cfg.student, checkpoint=None).to(dev)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    temperature = 4.0
    amp = autocast(args, dev)

    def step(i: int) -> None:
        x, y = batches(i)
        with amp:
            with torch.no_grad():
                soft = F.softmax(teacher(x) / temperature, dim=1)
            logits = student(x)
            kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * temperature**2 * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, args)


def handwritten_ce(args, batches, cfg, role: str, seed: int) -> float:
    """Cross-entropy training of `role`'s model on `batches` (Batches, or LoaderBatches: g's data path)."""
    model = seeded_model(cfg, role, seed).to(device(args))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = autocast(args, device(args))

    def step(i: int) -> None:
        x, y = batches(i)
        with amp:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, args)


class LoaderBatches:
    """Batches from a data module's training loader, in its order, moved to the device: (g)'s data path,
    the per-sample one with live augmentation."""

    def __init__(self, datamodule, dev: torch.device):
        self.datamodule, self.dev = datamodule, dev
        self.iterator = iter(())

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.iterator, None)
        if batch is None:  # a new epoch
            self.iterator = iter(self.datamodule.train_dataloader())
            batch = next(self.iterator)
        return batch["input"].to(self.dev, non_blocking=True), batch["target"].to(self.dev, non_blocking=True)


def stored_views_datamodule(args, overrides: list[str]):
    """An augmented data module that serves the stored views, as the cache's callback sets it up."""
    datamodule = augmented_datamodule(args)
    cfg, sources, scheme = kdlab_scheme(args, datamodule, ["teacher_cache.enabled=true", *overrides])
    weights = teacher_identity(sources.frozen, sources.modules["teacher"], cfg.teacher.name)["sha256"]
    cache = plan(cfg, cfg.teacher, datamodule, weights, scheme.teacher_tap)
    _, views = load_or_build(cache.entry, cache.layout, scheme.teacher_forward, datamodule, device(args), 1)
    datamodule.serve_stored_views(views)
    return datamodule


def teacher_forward(args, batches: Batches, cfg, channels_last: bool) -> float:
    teacher = seeded_model(cfg, "teacher", 0).to(batches.x.device).eval().requires_grad_(False)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(memory_format=layout)
    amp = autocast(args, batches.x.device)

    def step(i: int) -> None:
        with torch.no_grad(), amp:
            teacher(batches(i)[0].contiguous(memory_format=layout))

    return timed(step, args)


# ---------------------------------------------------------------------------------- report
def best_rates(variants: dict, repeats: int) -> dict[str, float]:
    """Run every variant `repeats` times, interleaved, and keep each one's best img/s.

    The best, as `timeit` keeps the fastest time: other load on the machine only ever slows a
    run down, so the fastest repeat is the closest to the variant's own cost.
    """
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, run in variants.items():
            rates[name].append(run())
            print(f"  [{repeat + 1}/{repeats}] {name:<28} {rates[name][-1]:10.1f} img/s", flush=True)
    return {name: max(values) for name, values in rates.items()}


def ratios(rates: dict[str, float]) -> dict[str, float]:
    # (e) is compared in time per image: DML's step against the two CE steps it replaces.
    peers_ce = 1.0 / (1.0 / rates["ce teacher (hand-written)"] + 1.0 / rates["d: student CE (hand-written)"])
    return {
        "b/a": rates["b: kdlab offline KD"] / rates["a: KD (hand-written)"],
        "c/d": rates["c: kdlab KD, cached"] / rates["d: student CE (hand-written)"],
        "c/b": rates["c: kdlab KD, cached"] / rates["b: kdlab offline KD"],
        "e/(ce_t+ce_s)": peers_ce / rates["e: kdlab online DML"],
        "channels_last": rates["teacher fwd, channels_last"] / rates["teacher fwd, contiguous"],
        "kdlab_baseline/d": rates["kdlab baseline (student CE)"] / rates["d: student CE (hand-written)"],
        "f/g": rates["f: kdlab KD, stored views"] / rates["g: CE, live augmentation (hand-written)"],
        "f/b_aug": rates["f: kdlab KD, stored views"] / rates["kdlab KD, augmented, live teacher"],
        "f/g_views": rates["f: kdlab KD, stored views"] / rates["CE on stored views (hand-written)"],
    }


def allocator_ab(args) -> dict[str, float]:
    """Loop (a) in two fresh processes: glibc's default malloc, then kdlab's tuning."""
    out = {}
    for mode in ("default", "tuned"):
        cmd = [sys.executable, __file__, "--only-a", "--malloc", mode, "--batches", str(args.batches)]
        cmd += [
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--workdir",
            str(args.workdir),
            "--precision",
            args.precision,
        ]
        cmd += ["--cpu"] if args.cpu else []
        cmd += ["--compile-teacher"] if args.compile_teacher else []
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])["a"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches before them")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU present")
    parser.add_argument(
        "--precision", choices=("32-true", "bf16-mixed"), default="32-true", help="as trainer.precision"
    )
    parser.add_argument(
        "--compile-teacher", action="store_true", help="torch.compile the KD variants' frozen teacher"
    )
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    parser.add_argument("--allocator", action="store_true", help="also measure glibc malloc tuning (a, A/B)")
    parser.add_argument("--data-root", type=Path, help="Fashion-MNIST files (default: the usual search)")
    parser.add_argument("--val-size", type=int, default=5000, help="validation split, as data.val_size")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "kdlab" / "bench")
    parser.add_argument("--views", type=int, default=2, help="stored views per sample for (f)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--only-a", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "tuned":
        tune_malloc()
    drop_failing_nvml_probe()  # as kdlab.run does
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning's per-fit banners
        logging.getLogger(name).setLevel(logging.ERROR)

    args.workdir.mkdir(parents=True, exist_ok=True)
    write_seeded_teacher(args)
    cfg = compose_cfg(common_overrides(args))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = Batches(datamodule, args.batch_size, device(args))
    if args.only_a:
        print(json.dumps({"a": timed_best(lambda: handwritten_kd(args, batches, cfg), args.repeats)}))
        return

    print(
        f"threads={torch.get_num_threads()} device={device(args)} "
        f"batch={args.batch_size} malloc={args.malloc} precision={args.precision} "
        f"compile_teacher={args.compile_teacher}"
    )
    build_seconds = build_cache(args, datamodule)
    print(f"teacher-output cache: built in {build_seconds:.1f} s" if build_seconds else "cache: entry reused")
    views = [*AUGMENTED, f"teacher_cache.views={args.views}"]
    compiled = teacher_options(args)
    live_augmented = augmented_datamodule(args)
    views_build_seconds = build_cache(args, live_augmented, views)
    served = stored_views_datamodule(args, views)
    variants = {
        "a: KD (hand-written)": lambda: handwritten_kd(args, batches, cfg),
        "b: kdlab offline KD": lambda: kdlab_rate(
            args, datamodule, ["teacher_cache.enabled=false", *compiled]
        ),
        "c: kdlab KD, cached": lambda: kdlab_rate(
            args, datamodule, ["teacher_cache.enabled=true", *compiled], cached=True
        ),
        "d: student CE (hand-written)": lambda: handwritten_ce(args, batches, cfg, "student", 1),
        "kdlab baseline (student CE)": lambda: kdlab_rate(args, datamodule, ["mode=baseline"]),
        "ce teacher (hand-written)": lambda: handwritten_ce(args, batches, cfg, "teacher", 0),
        "e: kdlab online DML": lambda: kdlab_rate(args, datamodule, ["mode=online"]),
        "teacher fwd, contiguous": lambda: teacher_forward(args, batches, cfg, channels_last=False),
        "teacher fwd, channels_last": lambda: teacher_forward(args, batches, cfg, channels_last=True),
        "f: kdlab KD, stored views": lambda: kdlab_rate(
            args, served, ["teacher_cache.enabled=true", *views, *compiled], cached=True
        ),
        "g: CE, live augmentation (hand-written)": lambda: handwritten_ce(
            args, LoaderBatches(live_augmented, device(args)), cfg, "student", 1
        ),
        "kdlab KD, augmented, live teacher": lambda: kdlab_rate(
            args, live_augmented, [*AUGMENTED, "teacher_cache.enabled=false", *compiled]
        ),
        "CE on stored views (hand-written)": lambda: handwritten_ce(
            args, LoaderBatches(served, device(args)), cfg, "student", 1
        ),
    }
    rates = best_rates(variants, args.repeats)
    figures = {"img_per_s": rates, "ratios": ratios(rates), "cache_build_s": build_seconds}
    figures["settings"] = {
        "device": str(device(args)),
        "precision": args.precision,
        "compile_teacher": args.compile_teacher,
        "batches": args.batches,
        "repeats": args.repeats,
    }
    figures["stored_views"] = views_figures(
        args, rates, views_build_seconds, len(live_augmented.train_set.dataset), len(live_augmented.train_set)
    )
    if args.allocator:
        figures["allocator_a_img_per_s"] = allocator_ab(args)
    print_report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def views_figures(
    args, rates: dict[str, float], build_seconds: float, split: int, trained: int
) -> dict[str, float]:
    """The stored views' build, and after how many runs it has paid for itself.

    A run of K epochs (one per stored view) saves, per image, the difference between the live
    teacher's step and the cached one; the build costs one teacher pass per view. Break-even: the
    build's seconds (over the whole split, `split` images per view) over one run's saving (K epochs
    over the `trained` images of the training part).
    """
    saving_per_image = 1 / rates["kdlab KD, augmented, live teacher"] - 1 / rates["f: kdlab KD, stored views"]
    per_run = saving_per_image * trained * args.views
    return {
        "views": args.views,
        "build_s": build_seconds,
        "build_img_per_s": split * args.views / build_seconds if build_seconds else float("nan"),
        "saving_per_run_s": per_run,
        "break_even_runs": build_seconds / per_run if per_run > 0 and build_seconds else float("nan"),
    }


def timed_best(run, repeats: int) -> float:
    return max(run() for _ in range(repeats))


def print_report(figures: dict) -> None:
    print("\n| variant | img/s |\n| --- | ---: |")
    for name, rate in figures["img_per_s"].items():
        print(f"| {name} | {rate:,.0f} |")
    print("\n| ratio | what | value | goal |\n| --- | --- | ---: | --- |")
    for name, value in figures["ratios"].items():
        what, op, goal = GOALS.get(name, (EXTRA_RATIOS.get(name, ""), "", None))
        target = ""
        if goal is not None:
            met = value >= goal if op == ">=" else value <= goal
            target = f"{op} {goal:.2f} ({'met' if met else 'NOT met'})"
        print(f"| {name} | {what} | {value:.3f} | {target} |")
    views = figures.get("stored_views")
    if views:
        print(
            f"\nstored views (K={views['views']}): built in {views['build_s']:.1f} s "
            f"({views['build_img_per_s']:,.0f} img/s); a run of K epochs saves "
            f"{views['saving_per_run_s']:.1f} s; "
            f"break-even after {views['break_even_runs']:.2f} runs"
        )
    if "allocator_a_img_per_s" in figures:
        ab = figures["allocator_a_img_per_s"]
        print(
            f"\nmalloc, loop (a): default {ab['default']:.0f} img/s, tuned {ab['tuned']:.0f} img/s "
            f"({ab['tuned'] / ab['default']:.2f}x)"
        )


if __name__ == "__main__":
    main()
