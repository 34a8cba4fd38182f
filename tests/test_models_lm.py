"""kdlab/models/hf_lm.py: Hugging Face causal LMs as kdlab models, built from tiny configs offline.

Each family's logits and tap points, loading from a local directory, and the bad input a user meets:
an unknown family, a path that is not there, a hub id without download=true, a vocabulary smaller than
the tokenizer's, and sequences longer than the context.
"""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.models.hf_lm import create_causal_lm
from kdlab.taps import FeatureTap, expand_layers

TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 4},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_a_tiny_model_gives_logits_and_hidden_states_at_every_position(family):
    lm = create_causal_lm(257, 32, family=family, config=TINY[family], eos_token_id=256)
    assert lm.context == 32 and lm.vocab_size == 257
    tap = FeatureTap(lm, expand_layers(lm, ["stages", "embedding"]))
    out = tap(torch.randint(0, 257, (2, 16)))
    assert out.logits.shape == (2, 16, 257)
    assert {name: tuple(f.shape) for name, f in out.feats.items()} == {
        "stage1": (2, 16, 32),
        "stage2": (2, 16, 32),
        "embedding": (2, 16, 32),
    }


def test_causality_a_later_token_changes_no_earlier_logit():
    lm = create_causal_lm(257, 32, family="gpt2", config=TINY["gpt2"]).eval()
    x = torch.randint(0, 257, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 257
    with torch.no_grad():
        assert torch.allclose(lm(x)[0, :8], lm(y)[0, :8], atol=1e-6)


def test_weights_load_from_a_local_directory(tmp_path):
    built = create_causal_lm(257, 32, family="gpt2", config=TINY["gpt2"]).eval()
    built.model.save_pretrained(tmp_path)
    loaded = create_causal_lm(257, 32, pretrained=str(tmp_path)).eval()
    x = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        assert torch.allclose(built(x), loaded(x))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"family": "gpt3"}, r"teacher.family='gpt3' is not a transformers model type\. Similar: .*gpt2"),
        ({"pretrained": "/no/such/dir"}, r"teacher.pretrained='/no/such/dir' is not a local directory"),
        ({"pretrained": "gpt2"}, r"set teacher.download=true"),
        ({}, r"teacher needs one of teacher.family .* or teacher.pretrained"),
        ({"family": "gpt2", "config": {"n_positions": 16, **TINY["gpt2"]}}, r"data.seq_len=32 is longer"),
    ],
)
def test_bad_input_is_one_clear_error(options, message):
    with pytest.raises(KdlabError, match=message):
        create_causal_lm(257, 32, config_key="teacher", **options)


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused(tmp_path):
    create_causal_lm(257, 32, family="gpt2", config=TINY["gpt2"]).model.save_pretrained(tmp_path)
    with pytest.raises(KdlabError, match=r"must share one tokenizer"):
        create_causal_lm(400, 32, pretrained=str(tmp_path), config_key="student")


def test_a_sequence_longer_than_the_context_says_what_to_set():
    lm = create_causal_lm(257, 16, family="gpt2", config=TINY["gpt2"])
    with pytest.raises(KdlabError, match=r"longer than the model's context of 16. Set data.seq_len=16"):
        lm(torch.zeros(1, 20, dtype=torch.int64))
