"""The frozen text encoder's prompt cache earns its place: a batch with any prompt not cached is encoded in one
call (the very states an uncached encoder gives), a fully cached batch encodes nothing, and a cache that serves
fewer than half the batches over its first `cache_size` prompts (distinct captions) switches itself off."""

from __future__ import annotations

import pytest
import torch

from latentdiff.text.encoder import TextEncoder
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.tokens import build_tokenizer

CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@pytest.fixture
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    config = load_model_config("clip-tiny")
    return TextEncoder(build_clip(config), build_tokenizer(config), model_config=config)


@pytest.fixture
def forwards(encoder, monkeypatch) -> list[int]:
    """The batch size of every call of the text transformer."""
    calls: list[int] = []
    real = encoder.forward_tokens

    def counting(tokens):
        calls.append(tokens.shape[0])
        return real(tokens)

    monkeypatch.setattr(encoder, "forward_tokens", counting)
    return calls


def _same(a, b) -> bool:
    return torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


def test_the_new_prompts_of_a_batch_are_encoded_in_one_call_and_cached_ones_keep_their_states(encoder, forwards):
    prompts = ["a cat", "a bird", "a dog", "", "a cat", "a bird"]
    encoder.frozen(cache_size=64)
    first = encoder.encode(["a cat", "a dog"])
    forwards.clear()
    out = encoder.encode(prompts)  # "a bird" and "" are new
    assert forwards == [2]  # the new prompts, each once, in one call
    with torch.no_grad():
        new = encoder(["a bird", ""])  # what an encoder without a cache gives for them
    assert torch.equal(out.states[[1, 3, 5]], new.states[[0, 1, 0]])
    assert torch.equal(out.pooled[[1, 3, 5]], new.pooled[[0, 1, 0]])
    # A cached prompt gives the row it was first given, whatever shares its batch now (no batch-invariance).
    assert torch.equal(out.states[[0, 2, 4]], first.states[[0, 1, 0]])
    assert torch.equal(out.mask[[0, 2, 4]], first.mask[[0, 1, 0]])
    assert torch.equal(out.mask[[1, 3, 5]], new.mask[[0, 1, 0]])


def test_a_batch_of_distinct_new_prompts_is_the_uncached_encoding(encoder, forwards):
    prompts = ["caption one", "caption two", ""]
    uncached = encoder.frozen(cache_size=0).encode(prompts)  # frozen as the cached one: eval mode, no grad
    encoder.frozen(cache_size=64)
    forwards.clear()
    out = encoder.encode(prompts)
    assert forwards == [3] and _same(out, uncached)


def test_a_prompt_is_the_same_whatever_batch_it_meets_again(encoder):
    encoder.frozen(cache_size=64)
    alone = encoder.encode(["a red circle"])
    for batch in (["a red circle", "a blue cross"], ["x " * 20, "a red circle", ""], ["a red circle"]):
        out = encoder.encode(batch)
        assert torch.equal(out.states[batch.index("a red circle")], alone.states[0])


def test_a_fully_cached_batch_encodes_nothing_and_gives_the_states_first_returned(encoder, forwards):
    encoder.frozen(cache_size=64)
    first = encoder.encode(["a cat", "a dog", ""])
    want = [t.clone() for t in (first.states, first.mask, first.pooled)]
    first.states.zero_()  # a caller editing its result must not touch the cache
    forwards.clear()
    again = encoder.encode(["", "a cat", "a cat"])
    assert forwards == []
    order = [2, 0, 0]
    assert torch.equal(again.states, want[0][order]) and torch.equal(again.mask, want[1][order])
    assert torch.equal(again.pooled, want[2][order]) and again.states.dtype == encoder.dtype


def test_distinct_captions_switch_the_cache_off_after_its_trial(encoder, forwards):
    encoder.frozen(cache_size=32)  # the trial: the first 32 prompts looked up
    for b in range(4):
        encoder.encode([f"caption number {8 * b + i}" for i in range(8)] + [""])  # "" as caption dropout gives
    assert not encoder.cache_on() and len(encoder._cache) == 0  # its memory is given back
    assert "off after its trial of 32 prompts: 0 of 2 batches in its second half" in encoder.cache_summary()
    forwards.clear()
    with torch.no_grad():
        uncached = encoder(["caption number 0", ""])
    out = encoder.encode(["caption number 0", ""])
    assert forwards == [2, 2] and _same(out, uncached)  # encoded, not looked up: the same states
    encoder.frozen(cache_size=32)  # frozen() again starts a new trial
    assert encoder.cache_on()


def test_class_captions_keep_the_cache_and_are_served_from_it(encoder, forwards):
    encoder.frozen(cache_size=64)  # a trial of 8 batches of 8, judged on the last 4
    g = torch.Generator().manual_seed(0)
    batches = [[f"a photo of a {CLASSES[i]}" for i in torch.randint(0, 10, (8,), generator=g)] for _ in range(12)]
    outs = [encoder.encode(b) for b in batches]
    assert encoder.cache_on() and encoder.cache_summary().startswith("text cache on")
    served = len(batches) - len(forwards)
    assert served >= 8  # once the ten classes are in, every batch is served
    assert sum(forwards) == len({p for b in batches for p in b})  # each class encoded once
    for prompts, out in zip(batches, outs):  # the same states as without a cache (cached rows came from other
        with torch.no_grad():  # batches, so equal up to float summation order)
            plain = encoder(prompts)
        assert torch.equal(out.mask, plain.mask)
        torch.testing.assert_close(out.states, plain.states, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pooled, plain.pooled, rtol=0, atol=1e-5)


def test_lengths_counted_on_the_host_equal_the_mask_cached_or_not(encoder):
    """The prior cuts the states at the longest prompt from `lengths` (no device read): they must be the mask's."""
    long = " ".join(["word"] * 200)  # truncated to the context
    prompts = ["", "a red circle", long, "ankle boot"]
    plain = encoder.encode(prompts)  # cache off
    assert plain.lengths == tuple(plain.mask.sum(dim=1).tolist())
    assert plain.lengths[2] == encoder.context_length
    encoder.frozen(cache_size=64)
    first, cached = encoder.encode(prompts), encoder.encode(prompts)  # encoded, then served from the cache
    for out in (first, cached):
        assert out.lengths == tuple(out.mask.sum(dim=1).tolist())
