"""Per-sample banks under DDP: two real CPU processes (gloo) keep CRD's and PS-KD's banks identical.

Each process feeds its own indices, as DistributedSampler hands them out; the banks of both
processes must end up equal to each other and to one process's banks updated with the union
of the batches. No Lightning: the processes are started with torch.multiprocessing and join a
gloo process group through a file, so no port is needed. They are forked where the OS can: a
forked process starts at once with the test's modules already imported, where a spawned one
imports torch and Lightning again (15 s for the two on a busy 2-core machine, 0.3 s forked).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kdlab.distributed import first_occurrences, gather_rows, mean_across_processes
from kdlab.knowledge import CRD, LossContext
from kdlab.schemes.pskd_bank import PredictionBank
from kdlab.taps import Outputs

WORLD = 2
SAMPLES, CLASSES, DIM = 20, 3, 4
# Step 1: disjoint indices of unequal counts (5 and 4). Step 2: index 2 on both processes, as
# DistributedSampler's padding repeats a sample; the lower rank's row must win on both.
STEPS = [([0, 3, 5, 7, 9], [1, 4, 6, 8]), ([2, 10, 11], [12, 2, 13])]


def step_rows(step: int) -> dict[str, torch.Tensor]:
    """Every row of a step, both processes' together, from a fixed seed (the same in every process)."""
    count = sum(len(part) for part in STEPS[step])
    generator = torch.Generator().manual_seed(step)
    return {
        "v_s": F.normalize(torch.randn(count, DIM, generator=generator), dim=1),
        "v_t": F.normalize(torch.randn(count, DIM, generator=generator), dim=1),
        "probs": torch.randn(count, CLASSES, generator=generator).softmax(1),
    }


def rank_slice(step: int, rank: int) -> slice:
    start = sum(len(part) for part in STEPS[step][:rank])
    return slice(start, start + len(STEPS[step][rank]))


def built_banks() -> tuple[CRD, PredictionBank]:
    torch.manual_seed(0)  # the CRD banks start random: the same start in every process
    crd = CRD(feat_dim=DIM, num_negatives=8)
    crd.build(
        Outputs(torch.zeros(2, CLASSES), {"embedding": torch.zeros(2, 6)}),
        Outputs(torch.zeros(2, CLASSES), {"embedding": torch.zeros(2, 5)}),
        LossContext(num_samples=SAMPLES),
    )
    return crd, PredictionBank(SAMPLES, CLASSES)


def z_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank rows (B, K+1, DIM) and anchors (B, DIM) of one process's first batch (equal sizes)."""
    generator = torch.Generator().manual_seed(100 + rank)
    rows = F.normalize(torch.randn(3, 5, DIM, generator=generator), dim=2)
    return rows, F.normalize(torch.randn(3, DIM, generator=generator), dim=1)


def scores(crd: CRD, rows: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """CRD's scores for these drawn rows: a bank that holds just them, each drawn once."""
    draws = torch.arange(rows.shape[0] * rows.shape[1]).view(rows.shape[:2])
    return crd.scores(rows.reshape(-1, rows.shape[2]), draws, anchors, direction=0)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        crd, bank = built_banks()
        for step in range(len(STEPS)):
            rows, mine = step_rows(step), rank_slice(step, rank)
            index = torch.tensor(STEPS[step][rank])
            crd.update_memory(index, rows["v_s"][mine], rows["v_t"][mine])
            bank.store(index, rows["probs"][mine], epoch=step)
        scores(crd, *z_inputs(rank))
        scores(crd, *z_inputs(1 - rank))  # a second call must keep the first Z
        mean = mean_across_processes(torch.tensor([float(rank)]))
        torch.save(
            {"crd": crd.state_dict(), "bank": bank.state_dict(), "mean": mean},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_banks_stay_identical_across_processes_and_equal_one_process_with_the_union(tmp_path):
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True, start_method=start
    )
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]

    # One process (no process group: gather_rows is the identity), fed the union of the batches,
    # with a repeated index's later rows left out, as the gather keeps the lowest rank's row.
    crd, bank = built_banks()
    for step in range(len(STEPS)):
        rows = step_rows(step)
        index = torch.tensor([i for part in STEPS[step] for i in part])
        keep = first_occurrences(index)
        crd.update_memory(index[keep], rows["v_s"][keep], rows["v_t"][keep])
        bank.store(index[keep], rows["probs"][keep], epoch=step)
    first_rows, first_anchors = zip(*(z_inputs(rank) for rank in range(WORLD)), strict=True)
    scores(crd, torch.cat(first_rows), torch.cat(first_anchors))  # Z over the union

    for state in states:
        assert state["mean"].item() == 0.5
        for name, expected in crd.state_dict().items():
            assert torch.allclose(state["crd"][name], expected, atol=1e-6), name
        for name, expected in bank.state_dict().items():
            assert torch.equal(state["bank"][name], expected), name
    for name in states[0]["crd"]:
        assert torch.equal(states[0]["crd"][name], states[1]["crd"][name]), name
    # Every index of both processes was written, on both; the repeated one holds rank 0's row.
    written = sorted({i for step in STEPS for part in step for i in part})
    assert states[1]["bank"]["seen"].nonzero().flatten().tolist() == written
    assert torch.equal(states[1]["bank"]["probs"][2], step_rows(1)["probs"][0])
    assert states[0]["crd"]["normalizers"][0] > 0 and states[0]["crd"]["normalizers"][1] < 0


def test_gather_rows_and_the_mean_are_the_identity_in_one_process():
    index, values = torch.tensor([3, 1, 3]), torch.arange(6.0).view(3, 2)
    assert all(a is b for a, b in zip(gather_rows(index, values), (index, values), strict=True))
    value = torch.tensor([2.0])
    assert mean_across_processes(value) is value
    assert first_occurrences(torch.tensor([5, 2, 5, 2, 7])).tolist() == [1, 0, 4]
