"""The schemes on language models, built directly: what each step computes, checked by hand.

- The task (kdlab.tasks): the counted tokens, perplexity as exp of the mean cross-entropy.
- Masking: positions labelled -100 (padding, a prompt) change no loss and no metric.
- On-policy (GKD): the student generates, the prompt's labels do not count, and the loss's gradient
  reaches the student only.
- SeqKD: the student's batches are the stored teacher text, its prompt not counted.
- Self (BYOT): an exit per shallow block, each predicting the next token.
- MiniLM: its relation loss reaches the student's attention weights, and is 0 for a copy of the teacher.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.data.text import IGNORE_INDEX
from kdlab.errors import KdlabError
from kdlab.knowledge import KD, MiniLM, SequenceKD
from kdlab.models.hf_lm import create_causal_lm
from kdlab.schemes import BYOT, Offline, OnPolicy, SeqKD
from kdlab.schemes.seqkd import TeacherText
from kdlab.tasks import LanguageModeling

VOCAB, SEQ = 257, 16


def lm(layers=2, width=32, heads=2, seed=0, family="gpt2"):
    torch.manual_seed(seed)
    if family == "llama":
        config = {
            "num_hidden_layers": layers,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_attention_heads": heads,
            "num_key_value_heads": max(heads // 2, 1),
        }
    else:
        config = {"n_layer": layers, "n_embd": width, "n_head": heads, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
        config["attn_pdrop"] = 0.0  # no dropout: a step's losses are then functions of the batch alone
    return create_causal_lm(VOCAB, SEQ, family=family, config=config, eos_token_id=VOCAB - 1)


def common(knowledge=None):
    return {
        "optimizer": functools.partial(torch.optim.SGD, lr=0.1),
        "num_classes": VOCAB,
        "input_shape": (SEQ,),
        "task": LanguageModeling(VOCAB, SEQ),
        "knowledge": knowledge,
    }


def batch(size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB - 1, (size, SEQ + 1), generator=g)
    return {"input": tokens[:, :-1], "target": tokens[:, 1:].clone(), "index": torch.arange(size)}


def test_the_task_counts_labelled_tokens_and_its_perplexity_is_exp_of_the_mean_cross_entropy():
    task = LanguageModeling(VOCAB, SEQ)
    logits = torch.randn(2, SEQ, VOCAB)
    target = torch.randint(0, VOCAB, (2, SEQ))
    target[1, 5:] = IGNORE_INDEX
    flat, labels = task.predictions(logits, target)
    assert flat.shape == (SEQ + 5, VOCAB) and labels.shape == (SEQ + 5,)
    metrics = task.metrics("test/")
    metrics.update(flat, labels)
    values = metrics.compute()
    by_hand = sum(
        -F.log_softmax(logits[b, t], -1)[target[b, t]]
        for b in range(2)
        for t in range(SEQ)
        if target[b, t] >= 0
    )
    assert float(values["test/perplexity"]) == pytest.approx(math.exp(float(by_hand) / (SEQ + 5)), rel=1e-5)
    correct = sum(
        int(logits[b, t].argmax() == target[b, t]) for b in range(2) for t in range(SEQ) if target[b, t] >= 0
    )
    assert float(values["test/top1"]) == pytest.approx(correct / (SEQ + 5))


def test_masked_positions_change_no_loss(tmp_path):
    teacher, student = lm(width=32, seed=0), lm(width=16, seed=1)
    terms = {"kd": KD(temperature=2.0, weight=1.0, task_weight=1.0), "gkd": SequenceKD(divergence="jsd")}
    scheme = Offline(teacher, student, **common(terms))
    full = batch()
    masked = {**full, "target": full["target"].clone()}
    masked["target"][:, 10:] = IGNORE_INDEX
    # The same first 10 positions, the rest replaced by other tokens: masked, they must not matter.
    scrambled = {**masked, "input": masked["input"].clone()}
    scrambled["input"][:, 11:] = (scrambled["input"][:, 11:] + 7) % (VOCAB - 1)
    terms_a = scheme.loss_terms(
        scheme.student_tap(masked["input"]), scheme.sources(masked["input"], {}), masked
    )
    terms_b = scheme.loss_terms(
        scheme.student_tap(scrambled["input"]), scheme.sources(scrambled["input"], {}), scrambled
    )
    for name in terms_a:  # causal models: positions < 10 never see the scrambled tokens
        assert float(terms_a[name].detach()) == pytest.approx(float(terms_b[name].detach()), rel=1e-5), name
    # and the task term is the cross-entropy over the 10 counted positions, by hand
    logits = student(masked["input"])[:, :10]
    by_hand = F.cross_entropy(logits.flatten(0, 1), masked["target"][:, :10].flatten())
    assert float(terms_a["task"]) == pytest.approx(float(by_hand), rel=1e-5)


def test_on_policy_generates_and_its_gradient_reaches_only_the_student():
    teacher, student = lm(width=32, seed=0), lm(width=16, seed=1)
    gkd = SequenceKD(divergence="jsd", beta=0.5, weight=1.0, task_weight=0.0)
    scheme = OnPolicy(teacher, student, **common({"gkd": gkd}), student_data_fraction=1.0, prompt_tokens=4)
    data = batch()
    sampled = scheme.student_batch(data)
    assert sampled["input"].shape == data["input"].shape
    assert torch.equal(sampled["input"][:, :4], data["input"][:, :4])  # the prompt is kept
    assert not torch.equal(sampled["input"][:, 4:], data["input"][:, 4:])  # the rest is the student's
    assert (sampled["target"][:, :3] == IGNORE_INDEX).all() and (
        sampled["target"][:, -1] == IGNORE_INDEX
    ).all()
    assert torch.equal(sampled["target"][:, 3:-1], sampled["input"][:, 4:])
    sampled_batches = []
    scheme.student_batch = lambda b: sampled_batches.append(b) or OnPolicy.student_batch(scheme, b)
    torch.manual_seed(0)
    loss = scheme.training_step(data, 0)
    assert len(sampled_batches) == 1  # lambda = 1: the step trained on the student's own samples
    terms = scheme._step_terms.rows[0]  # this step's logged terms: task, gkd, total
    assert float(terms[0]) == 0.0 and float(terms[1]) > 0  # no cross-entropy on its own samples
    loss.backward()
    # The teacher is frozen (no parameter takes a gradient); the student's weights get one.
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_on_policy_refuses_a_prompt_as_long_as_the_window():
    with pytest.raises(KdlabError, match=r"mode.prompt_tokens=16: .* in \[1, 15\]"):
        OnPolicy(lm(), lm(width=16), **common(), prompt_tokens=SEQ)


def test_seqkd_decodes_a_window_once_stores_it_and_trains_on_it_without_its_prompt(tmp_path):
    teacher, student = lm(width=32, seed=0), lm(width=16, seed=1)
    text = TeacherText(tmp_path / "text", windows=6, length=SEQ)
    scheme = SeqKD(teacher, student, **common(), teacher_text=text, prompt_tokens=5)
    data = batch(size=3)
    data["index"] = torch.tensor([4, 0, 2])
    replaced = scheme.teacher_batch(data)
    # The teacher's greedy continuation of each window's first 5 tokens, now in the store.
    expected = teacher.sample(data["input"][:, :5], SEQ - 5, greedy=True)
    assert torch.equal(replaced["input"], expected)
    assert text.missing(torch.arange(6)).tolist() == [False, True, False, True, False, True]
    assert (replaced["target"][:, :4] == IGNORE_INDEX).all() and (
        replaced["target"][:, -1] == IGNORE_INDEX
    ).all()
    assert torch.equal(replaced["target"][:, 4:-1], expected[:, 5:])
    # Another run (another process) reads the stored text: the teacher is not asked again.
    reopened = TeacherText(tmp_path / "text", windows=6, length=SEQ)
    assert torch.equal(reopened.read(data["index"]), expected)
    scheme.teacher_text, scheme.teacher = reopened, None  # the teacher would fail if it were called
    assert torch.equal(scheme.teacher_batch(data)["input"], expected)


def test_self_distillation_gives_each_shallow_block_an_exit_that_predicts_the_next_token():
    student = lm(layers=3, width=16)
    scheme = BYOT(student, **common({"kd": KD(temperature=3.0, weight=0.3, task_weight=0.7)}))
    outputs = scheme.exit_outputs(batch()["input"])
    assert set(outputs) == {"exit1", "exit2", "student"}
    assert all(out.logits.shape == (4, SEQ, VOCAB) for out in outputs.values())
    loss = scheme.training_step(batch(), 0)
    loss.backward()
    assert scheme.exits.exits["stage1"][1].weight.grad is not None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_minilm_reaches_the_students_attention_and_vanishes_for_a_copy_of_the_teacher(family):
    teacher = lm(width=32, heads=4, family=family)
    student = lm(width=16, heads=2, seed=1, family=family)
    term = MiniLM(relation_heads=4)
    scheme = Offline(teacher, student, **common({"minilm": term}))
    data = batch()
    terms = scheme.loss_terms(scheme.student_tap(data["input"]), scheme.sources(data["input"], {}), data)
    assert float(terms["minilm"]) > 0
    terms["minilm"].backward()
    attention = student.blocks[-1].attn.c_attn if family == "gpt2" else student.blocks[-1].self_attn.q_proj
    assert attention.weight.grad is not None and attention.weight.grad.abs().sum() > 0
    same = Offline(teacher, copy.deepcopy(teacher), **common({"minilm": MiniLM(relation_heads=4)}))
    terms = same.loss_terms(same.student_tap(data["input"]), same.sources(data["input"], {}), data)
    assert float(terms["minilm"]) == pytest.approx(0.0, abs=1e-6)


def test_minilm_is_refused_for_an_image_model():
    from kdlab.models import create_model

    with pytest.raises(KdlabError, match="reads the self-attention of a language model"):
        Offline(
            create_model("deepnn", 10, 1, 28),
            create_model("lightnn", 10, 1, 28),
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
            num_classes=10,
            input_shape=(1, 28, 28),
            knowledge={"minilm": MiniLM()},
        )


def test_sampling_is_from_the_whole_distribution_and_greedy_is_its_argmax():
    model = lm(width=16).eval()
    prompt = torch.randint(0, VOCAB - 1, (3, 4))
    greedy = model.sample(prompt, 8, greedy=True)
    with torch.no_grad():
        logits = model(greedy)[:, 3:-1]
    chosen = logits.gather(-1, greedy[:, 4:, None]).squeeze(-1)
    assert torch.equal(chosen, logits.max(-1).values)  # each token the teacher-forced argmax
    # With every logit equal, samples cover the vocabulary (no top-k filter) and may end documents.
    with torch.no_grad():
        model.model.lm_head.weight.zero_()
    torch.manual_seed(0)
    drawn = model.sample(torch.zeros(256, 1, dtype=torch.int64), SEQ - 1)[:, 1:]  # 3840 draws of 257
    assert drawn.unique().numel() > 200 and bool((drawn == VOCAB - 1).any())


def test_generated_text_is_never_served_from_the_cache_of_the_datas_teacher_outputs():
    from kdlab.schemes.on_policy import continuation_batch

    class DataCache:  # stands in for a cache entry: it holds outputs for the data's windows only
        live_layers = ()

        def lookup(self, index, view=None):
            raise AssertionError("a generated batch was looked up in the cache of the data's outputs")

    teacher, student = lm(width=32, seed=0), lm(width=16, seed=1)
    scheme = Offline(teacher, student, **common({"kd": KD(temperature=1.0)}))
    scheme.use_teacher_outputs(DataCache())
    generated = {**batch(), **continuation_batch(batch(seed=2)["input"], prompt_tokens=4)}
    served = scheme.sources(generated["input"], generated)
    torch.testing.assert_close(served.logits, scheme.teacher_forward(generated["input"]).logits)
