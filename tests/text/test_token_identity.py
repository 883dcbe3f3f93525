"""Word identity in the token states: the loss by hand, the word mask, the probe, training on scenes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentdiff.text.encoder import TextEncoder, TextOutput
from latentdiff.text.evaluate import token_identity_accuracy
from latentdiff.text.loss import token_identity_loss
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.tokens import build_tokenizer
from tests.helpers import train_text_on_scenes


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    config = load_model_config("clip-tiny")
    return TextEncoder(build_clip(config), build_tokenizer(config), model_config=config).eval()


def test_word_mask_leaves_out_sot_eot_and_padding(encoder):
    tokens = encoder.tokenize(["a red star", "a star"])
    words = encoder.word_mask(tokens)
    assert words[0].nonzero().flatten().tolist() == [1, 2, 3] and words[1].nonzero().flatten().tolist() == [1, 2]
    ends = encoder.word_mask(tokens, ends=True)
    assert ends[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # SOT..EOT: forward_tokens' mask
    assert tokens[0, 4] == encoder.tokenizer.eot_token_id


def test_token_identity_loss_is_each_words_cross_entropy_over_the_batchs_words():
    torch.manual_seed(0)
    embedding = torch.randn(10, 6, dtype=torch.float64)
    tokens = torch.tensor([[0, 3, 5, 9, 9], [0, 5, 7, 9, 9]])  # SOT 0, EOT 9, words 3, 5, 7
    words = torch.tensor([[False, True, True, False, False], [False, True, True, False, False]])
    states = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    loss = token_identity_loss(states, tokens, words, embedding, temperature=0.5)
    keys = F.normalize(embedding[[3, 5, 7]], dim=-1)
    by_hand = []
    for b, t, own in ((0, 1, 0), (0, 2, 1), (1, 1, 1), (1, 2, 2)):
        logits = F.normalize(states[b, t], dim=-1) @ keys.T / 0.5
        by_hand.append(-torch.log_softmax(logits, 0)[own])
    torch.testing.assert_close(loss.double(), torch.stack(by_hand).mean())
    loss.backward()
    assert states.grad[:, [0, 3, 4]].abs().sum() == 0  # SOT, EOT and padding are not scored
    # States that are their own word's embedding score near 0. One state for every word can do no better than
    # the entropy of the words' frequencies (3, 5, 5, 7: H(1/4, 1/2, 1/4)), reached when its softmax is them.
    exact = token_identity_loss(embedding[tokens], tokens, words, embedding, temperature=0.01)
    same = token_identity_loss(torch.ones(2, 5, 6, dtype=torch.float64), tokens, words, embedding)
    entropy = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert exact.item() < 0.05 and same.item() >= entropy
    zero = token_identity_loss(states, tokens, torch.zeros_like(words), embedding)
    assert zero.item() == 0 and zero.requires_grad


def test_probe_reads_states_that_keep_their_word_and_states_that_do_not(encoder, monkeypatch):
    captions = ["a star to the left of a ring", "a star to the right of a ring", "a star to the left of a ring"]
    table = encoder.model.token_embedding.weight

    def states_are(fn):
        monkeypatch.setattr(encoder, "forward_tokens", lambda tokens: TextOutput(fn(tokens), None, None))
        return token_identity_accuracy(encoder, captions)

    kept = states_are(lambda tokens: table[tokens] * 3)
    assert kept == {"token_identity_accuracy": 1.0, "token_identity_words": 16}  # two distinct captions, 8 words
    # Context that swamps the word: every state the same, so one word is right wherever it stands.
    swamped = states_are(lambda tokens: table[tokens[:1, 1:2]].expand(*tokens.shape, -1))
    assert swamped["token_identity_accuracy"] == pytest.approx(4 / 16)  # "a" is 2 of the 8 words of each
    assert token_identity_accuracy(encoder, []) == {}


def test_text_stage_trains_the_word_identity_term_on_scenes(tmp_path):
    summary, logged, _ = train_text_on_scenes(tmp_path, "token_identity=0.5")
    steps = [m for m in logged if "token_identity_loss" in m]
    assert len(steps) == 3
    for m in steps:  # the logged loss is the contrast plus half the word identity term
        assert m["loss"] == pytest.approx(m["clip_loss"] + 0.5 * m["token_identity_loss"], rel=1e-5)
        assert 0 < m["token_identity_loss"] < 10
    assert 0 <= summary["val_token_identity_accuracy"] <= 1 and summary["val_token_identity_words"] > 12
