"""task=lm through the command line, on the real corpus (Debian's fortunes) with tiny models.

Every language-model scheme with every kind of knowledge trains in one multirun; each job's reported
perplexity is then recomputed from the student.pt it saved, by hand, outside kdlab's metrics. Bad input
(an unknown model, mismatched tokenizers, an empty corpus, windows longer than a model's context) gets
its clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdlab.data.text import IGNORE_INDEX, TextCorpusDataModule
from kdlab.models.hf_lm import create_causal_lm
from tests.conftest import cli_overrides, lm_overrides, run_main

MODES = ("offline", "online", "self", "on_policy", "seqkd")
FAMILIES = ("response", "feature", "relation")
# The language-model losses, each with the schemes whose student reads a teacher's attention or logits.
LM_KNOWLEDGE = ("minilm", "gkd", "minillm", "distillm")


def jobs_of(sweep: Path) -> dict[tuple[str, str], Path]:
    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        overrides = dict(
            line[2:].strip().split("=", 1)
            for line in (job / ".hydra" / "overrides.yaml").read_text().splitlines()
            if line.startswith("- ") and line[2:].split("=")[0] in ("mode", "knowledge")
        )
        jobs[overrides["mode"], overrides["knowledge"]] = job
    return jobs


@pytest.fixture(scope="module")
def lm_sweep(tmp_path_factory, fortunes) -> dict[tuple[str, str], Path]:
    """Two multiruns: every scheme x {response, feature, relation}, and the LM losses under the schemes
    with a teacher or peers. {(mode, knowledge): job directory}."""
    tmp_path = tmp_path_factory.mktemp("lm_sweep")
    store = tmp_path / "teachers"
    base = [o for o in lm_overrides(tmp_path, store) if not o.startswith("paths.output_dir")]
    jobs = {}
    for name, sweep_args in {
        "families": [f"mode={','.join(MODES)}", f"knowledge={','.join(FAMILIES)}"],
        "lm_losses": ["mode=offline,online,on_policy", f"knowledge={','.join(LM_KNOWLEDGE)}"],
    }.items():
        sweep = tmp_path / name
        proc = run_main(["-m", *base, f"hydra.sweep.dir={sweep}", *sweep_args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        jobs.update(jobs_of(sweep))
    return jobs


EXPECTED = [(m, k) for m in MODES for k in FAMILIES] + [
    (m, k) for m in ("offline", "online", "on_policy") for k in LM_KNOWLEDGE
]


@pytest.mark.parametrize(("mode", "knowledge"), EXPECTED)
def test_every_scheme_and_knowledge_trains_a_language_model(lm_sweep, mode, knowledge):
    job = lm_sweep.get((mode, knowledge))
    assert job is not None and (job / "metrics.json").exists(), (
        f"mode={mode} knowledge={knowledge} did not finish"
    )
    results = json.loads((job / "metrics.json").read_text())
    rows = {row["model"]: row for row in results["models"]}
    student = rows["student"]
    # Perplexity over 257 tokens: above 1, and after two steps near a uniform guess's 257, not far above.
    assert 1 < student["test ppl"] < 257 * 1.5
    assert 0 <= student["test top-1"] <= 1
    if mode in ("offline", "on_policy", "seqkd"):
        assert rows["teacher"]["test ppl"] > 1
        assert 0 <= student["agreement"] <= 1 and student["KL to teacher"] >= 0
    if mode == "self":  # BYOT's exits on the shallow blocks are tested too
        assert "exit1" in rows
    samples = (job / "samples.md").read_text()
    assert "## student, prompt 0" in samples


def recomputed_perplexity(job: Path) -> float:
    """exp of the mean next-token cross-entropy of the saved student on the run's first test batch,
    computed here with torch alone (the run tested one batch: limit_test_batches=1)."""
    config = json.loads((job / "metrics.json").read_text())
    assert config["models"]
    data = TextCorpusDataModule(seq_len=32, batch_size=8)
    data.setup()
    batch = next(iter(data.test_dataloader()))
    model = create_causal_lm(257, 32, family="gpt2", config={"n_layer": 2, "n_embd": 16, "n_head": 2})
    model.load_state_dict(torch.load(job / "student.pt", weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        logits = model(batch["input"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE_INDEX)
    return math.exp(float(loss))


@pytest.mark.parametrize("mode", ["offline", "online", "on_policy"])
def test_reported_perplexity_is_recomputed_from_the_saved_student(lm_sweep, mode):
    job = lm_sweep[mode, "response"]
    reported = json.loads((job / "metrics.json").read_text())["metrics"]["test/student/perplexity"]
    assert reported == pytest.approx(recomputed_perplexity(job), rel=1e-4)


# ------------------------------------------------------------------------------------ bad input
BAD_INPUT = {
    "unknown_family": (["teacher.family=gtp2"], "teacher.family='gtp2' is not a transformers model type"),
    "missing_weights": (
        ["model@teacher=lm/pretrained", "teacher.pretrained=/nowhere/gpt2"],
        "teacher.pretrained='/nowhere/gpt2' is not a local directory",
    ),
    "mismatched_tokenizers": (
        ["+teacher.config.vocab_size=300"],
        "teacher has a vocabulary of 300 tokens, but the data's tokenizer makes 257",
    ),
    "prompt_too_long": (
        ["mode=on_policy", "mode.prompt_tokens=32"],
        "mode.prompt_tokens=32: the prompt is the first tokens of each window of data.seq_len=32",
    ),
    "image_scheme": (["mode=pskd"], "mode=pskd is defined for task=image, and this run's task is lm"),
    "too_long_windows": (
        ["data.seq_len=64", "+student.config.n_positions=48"],
        "data.seq_len=64 is longer than student's context of 48 tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_language_model_input_is_refused_clearly(tmp_path, fortunes, case):
    overrides, message = BAD_INPUT[case]
    # A pretrained model's sizes are its own: the tiny teacher's config does not apply to it.
    dropped = (
        ("paths.output_dir", "teacher.config")
        if "model@teacher=lm/pretrained" in overrides
        else ("paths.output_dir",)
    )
    args = [*(o for o in lm_overrides(tmp_path) if not o.startswith(dropped)), *overrides]
    proc = run_main([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if case in ("prompt_too_long", "image_scheme"):  # refused before a teacher is trained for nothing
        assert not (tmp_path / "teachers").exists()


def test_a_language_model_scheme_is_refused_for_images_before_any_teacher_is_trained(tmp_path, fashion_mnist):
    args = [o for o in cli_overrides(tmp_path) if not o.startswith("paths.output_dir")]
    proc = run_main([*args, "mode=on_policy"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "mode=on_policy is defined for task=lm, and this run's task is image" in proc.stderr
    assert not (tmp_path / "teachers").exists()


def test_an_empty_corpus_is_refused_clearly(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("\n%\n")
    args = [o for o in lm_overrides(tmp_path) if not o.startswith("paths.output_dir")]
    proc = run_main(
        [
            *args,
            f"data.root={tmp_path / 'corpus'}",
            "data.pattern=*.txt",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "has no text: 1 file(s) matching '*.txt', no non-empty document" in proc.stderr


def test_a_language_model_student_exports_to_onnx(lm_sweep, tmp_path):
    from tests.test_export import export, onnx_packages

    onnx_packages()
    out = tmp_path / "student.onnx"
    proc = export(lm_sweep["offline", "response"], "--format", "onnx", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Token windows of 32 in, next-token logits out, as PyTorch gives them (the script checks to 1e-4).
    assert (
        out.is_file()
        and "input [32] with a dynamic batch axis" in proc.stdout
        and "(within 1e-04)" in proc.stdout
    )
