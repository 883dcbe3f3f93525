"""TextEncoder over open_clip: tokenisation edge cases, exactness against open_clip, loading paths, metrics.

CPU, the tiny config with random weights; nothing is downloaded.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latentdiff.core import checkpoint as ckpt
from latentdiff.core.checkpoint import CheckpointError
from latentdiff.text import tokens as tokens_module
from latentdiff.text.encoder import TextEncoder, TextOutput
from latentdiff.text.evaluate import retrieval_metrics, zero_shot_accuracy
from latentdiff.text.model import build_clip, load_model_config, preprocess_images
from latentdiff.text.sources import (
    load_pretrained,
    load_text_encoder,
    parse_spec,
)
from latentdiff.text.tokens import PromptTruncatedWarning, build_tokenizer, tokenize
from tests.helpers import write_text_run

EDGE_PROMPTS = [
    "",
    "a" * 10_000,
    "Größe naïve café",
    "a cat 🐱🚀👩‍👩‍👧",
    "\x00\x07\n\t",
    "a photo of a dog",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    config = load_model_config("clip-tiny")
    return TextEncoder(build_clip(config), build_tokenizer(config), model_config=config)


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a socket connection."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"network lookup attempted in a test: {host}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    return attempts


def outputs_equal(a: TextOutput, b: TextOutput) -> bool:
    return torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


# ---- tokenisation -----------------------------------------------------------------------------


def test_edge_prompts_never_raise_and_have_the_right_shapes(encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        out = encoder(EDGE_PROMPTS)
    B, T, D, E = len(EDGE_PROMPTS), encoder.context_length, encoder.width, encoder.embed_dim
    assert (T, D, E) == (32, 128, 128)
    assert out.states.shape == (B, T, D) and out.mask.shape == (B, T) and out.pooled.shape == (B, E)
    assert out.mask.dtype == torch.bool
    assert torch.isfinite(out.states).all() and torch.isfinite(out.pooled).all()
    # the unconditional prompt is exactly SOT, EOT
    assert out.mask[0].tolist() == [True, True] + [False] * (T - 2)
    # ftfy drops the control characters and whitespace leaves nothing: also just SOT, EOT
    assert out.mask[4].sum() == 2
    # the mask is a prefix: True up to the EOT, then False
    lengths = out.mask.sum(dim=1)
    assert torch.equal(out.mask, torch.arange(T)[None, :] < lengths[:, None])
    assert lengths[1] == T  # the 10,000-character prompt fills the context


def test_tokens_match_open_clip_simple_tokenizer(encoder):
    prompts = ["", "a photo of a dog", "Größe naïve café 🐱", "word " * 50, "&amp; HTML  spaces\tand\nlines"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ours = encoder.tokenize(prompts)
    theirs = open_clip.SimpleTokenizer(context_length=encoder.context_length)(prompts)
    assert torch.equal(ours, theirs)


def test_long_prompt_warns_with_the_dropped_count(encoder):
    encoder = TextEncoder(encoder.model, encoder.tokenizer)  # a fresh encoder: one that has not warned yet
    prompt = "a large red circle on the left " * 10
    n_tokens = len(encoder.tokenizer.encode(prompt))
    dropped = n_tokens - (encoder.context_length - 2)
    assert dropped > 0
    with pytest.warns(PromptTruncatedWarning) as record:
        out = encoder(["short prompt", prompt])
    message = str(record[0].message)
    assert "1 of 2 prompts" in message and "prompt 1" in message
    assert f"{n_tokens} tokens, dropped {dropped}" in message
    tokens = encoder.tokenize(["short"])  # no warning for prompts that fit
    assert out.mask[1].all()
    assert tokens[0, 2] == encoder.tokenizer.eot_token_id
    # The module-level tokenize keeps warning on every call that truncates.
    with pytest.warns(PromptTruncatedWarning, match="1 of 1 prompts"):
        tokenize(encoder.tokenizer, [prompt], encoder.context_length)


def test_truncation_warns_once_per_encoder_with_a_count(encoder):
    encoder = TextEncoder(encoder.model, encoder.tokenizer)
    long = "a large red circle on the left " * 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):  # five training batches, each with long captions
            encoder([long, "short", long + str(step)])
    truncations = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(truncations) == 1
    assert "2 of 3 prompts" in str(truncations[0].message) and "Warned once" in str(truncations[0].message)
    assert encoder.truncation_summary() == "10 of 15 prompts were truncated to the context of 32 tokens"
    assert TextEncoder(encoder.model, encoder.tokenizer).truncation_summary() is None


@pytest.mark.parametrize("special", ["<end_of_text>", "<start_of_text>", "<END_OF_TEXT>", "&lt;end_of_text&gt;"])
def test_special_token_text_in_a_prompt_is_plain_text(encoder, special):
    tok = encoder.tokenizer
    prompt = f"a red {special} circle on the left"
    tokens = encoder.tokenize([prompt])[0].tolist()
    assert tokens[0] == tok.sot_token_id
    assert tokens.count(tok.eot_token_id) == 1 and tokens.count(tok.sot_token_id) == 1  # no early end, no restart
    eot = tokens.index(tok.eot_token_id)
    # The rest of the prompt survives: the ids end with those of "circle on the left".
    assert tokens[eot - 4 : eot] == tok.encode("circle on the left")
    # The literal is read as the characters it is made of: "<", "end", "_", "of", "_", "text", ">".
    name = special.lower().replace("&lt;", "<").replace("&gt;", ">")
    assert tok.decode(tokens[1:eot]).replace(" ", "") == f"ared{name}circleontheleft"
    # The pooled embedding sees the whole prompt: it differs from the prompt cut at the literal.
    with torch.no_grad():
        assert not torch.allclose(encoder([prompt]).pooled, encoder(["a red"]).pooled)


def test_tokens_use_only_the_tokenizers_public_api():
    source = Path(tokens_module.__file__).read_text()
    for private in ("byte_encoder", ".bpe(", ".pat", "clean_fn", ".encoder["):
        assert private not in source


def test_truncation_keeps_eot_last(encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        tokens = encoder.tokenize(["dog " * 100])
    assert tokens[0, 0] == encoder.tokenizer.sot_token_id
    assert tokens[0, -1] == encoder.tokenizer.eot_token_id
    assert (tokens[0] == encoder.tokenizer.eot_token_id).sum() == 1


def test_none_and_non_strings_raise_type_error(encoder):
    with pytest.raises(TypeError, match='prompt 1 is None; use ""'):
        encoder(["a cat", None])
    with pytest.raises(TypeError, match="prompt 0 is a int"):
        encoder([3])
    with pytest.raises(TypeError, match="single string"):
        encoder("a cat")


def test_empty_batch(encoder):
    out = encoder([])
    assert out.states.shape == (0, encoder.context_length, encoder.width) and out.pooled.shape == (0, encoder.embed_dim)


def test_tokenizer_needs_no_network(no_network):
    tokenizer = build_tokenizer(load_model_config("clip-tiny"))  # reads the BPE merges shipped in open_clip
    tokens = tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 32) and tokens[0, 0] == tokenizer.sot_token_id
    assert no_network == []


# ---- exactness ---------------------------------------------------------------------------------


def test_pooled_equals_open_clip_encode_text(encoder):
    prompts = ["", "a photo of a dog", "Größe naïve café"]
    tokens = encoder.tokenize(prompts)
    out = encoder(prompts)
    assert torch.equal(out.pooled, encoder.model.encode_text(tokens))
    assert torch.equal(out.normalized_pooled(), encoder.model.encode_text(tokens, normalize=True))


def test_same_prompt_same_embedding_across_calls_and_batches(encoder):
    prompt = "a large red circle on the left"
    alone = encoder([prompt])
    assert outputs_equal(alone, encoder([prompt]))
    batches = [(["x", "a blue square " * 3, "", prompt, "green"], 3), ([prompt] * 7 + ["zzz"] * 20, 6)]
    for prompts, i in batches:
        out = encoder(prompts)
        n = int(alone.mask[0].sum())
        assert torch.equal(out.mask[i], alone.mask[0])
        # the causal mask keeps padding and other rows out of a prompt's states, so on CPU they
        # match bit for bit; the pooled projection is a batched matmul whose rounding may
        # depend on the batch size (BLAS blocking), hence a tolerance there.
        torch.testing.assert_close(out.states[i, :n], alone.states[0, :n], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.pooled[i], alone.pooled[0], rtol=0, atol=1e-5)


def test_encode_has_no_grad_and_its_cache_is_correct(encoder):
    prompts = ["a cat", "a dog", "a cat", ""]
    reference = encoder(prompts)
    try:
        encoder.frozen(cache_size=2)
        first = encoder.encode(prompts)
        assert not first.states.requires_grad
        torch.testing.assert_close(first.states, reference.states.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(first.pooled, reference.pooled.detach(), rtol=0, atol=1e-5)
        assert torch.equal(first.mask, reference.mask)
        assert len(encoder._cache) == 2  # LRU bound
        first.states.zero_()  # a caller editing its result must not touch the cache
        again = encoder.encode(["", "a dog"])
        assert torch.equal(again.states[0], encoder.encode([""]).states[0])
        assert again.states.abs().sum() > 0
    finally:
        encoder.requires_grad_(True).train()
        encoder._cache_size = 0
        encoder.clear_cache()


def test_encode_outputs_can_feed_a_trainable_network(encoder):
    """The prior trains cross-attention on states from a frozen encoder, cached or not."""
    layer = torch.nn.Linear(encoder.width, 1)
    try:
        encoder.frozen(cache_size=8)
        with torch.inference_mode():
            encoder.encode(["a cat"])  # fills the cache from inside inference mode
        for prompts in (["a cat", "a dog"], ["a cat"]):
            out = encoder.encode(prompts)
            layer(out.states).sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    finally:
        encoder.requires_grad_(True).train()
        encoder._cache_size = 0
        encoder.clear_cache()


def test_encode_image_normalises_reader_images(encoder):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # reader range [-1, 1], native size
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    expected = encoder.model.encode_image(((images + 1) / 2 - mean) / std)
    assert torch.equal(encoder.encode_image(images), expected)
    big = F.interpolate(images, size=(64, 64), mode="nearest")  # resized back to 32 inside
    assert encoder.encode_image(big, normalize=True).shape == (2, encoder.embed_dim)
    gray = images[:, :1]
    rgb = gray.expand(-1, 3, -1, -1)
    assert torch.equal(preprocess_images(gray, encoder.model), preprocess_images(rgb, encoder.model))


# ---- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_file_round_trip(encoder, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.detach().clone().contiguous() for k, v in encoder.model.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    loaded = load_pretrained("clip-tiny", str(path))
    assert loaded.source == f"openclip:clip-tiny:{path}"
    prompts = ["a photo of a dog", ""]
    assert outputs_equal(encoder(prompts), loaded(prompts))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(encoder.encode_image(images), loaded.encode_image(images))


def test_missing_pretrained_file_or_tag_fails_fast_with_instructions(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained("clip-tiny", str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path / "hub"))
    message = str(info.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message and "not in the cache" in message
    assert str(tmp_path / "hub") in message  # where the file is expected
    assert "--text openclip:ViT-B-32:/path/" in message
    with pytest.raises(ValueError, match="neither an existing file nor an open_clip pretrained tag"):
        load_pretrained("clip-tiny", "no_such_tag")
    assert time.perf_counter() - start < 10
    assert no_network == []


def test_cached_tag_is_found_without_network(encoder, tmp_path, monkeypatch, no_network):
    # A fake tag for clip-tiny laid out the way huggingface_hub caches files.
    tag_cfg = dict(open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k"), hf_hub="someone/clip-tiny-test/")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "clip-tiny", {"testtag": tag_cfg})
    repo = tmp_path / "hub" / "models--someone--clip-tiny-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(repo / "snapshots" / "abc123" / "open_clip_model.safetensors"))
    loaded = load_pretrained("clip-tiny", "testtag", cache_dir=str(tmp_path / "hub"))
    assert outputs_equal(encoder(["a dog"]), loaded(["a dog"]))
    assert no_network == []


def test_parse_spec():
    assert parse_spec("openclip:ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec(r"openclip:clip-tiny:C:\w\model.bin") == ("clip-tiny", r"C:\w\model.bin")
    for bad in ("openclip:ViT-B-32", "openclip::x", "clip:ViT-B-32:x"):
        with pytest.raises(ValueError, match="openclip:MODEL:PRETRAINED"):
            parse_spec(bad)


def test_run_directory_round_trip(encoder, tmp_path):
    run = write_text_run(tmp_path / "text", encoder.model)
    loaded = load_text_encoder(run)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert loaded.model_config == encoder.model_config
    prompts = ["a photo of a dog", "Größe"]
    assert all(
        torch.equal(a, b) for a, b in zip(encoder.model.state_dict().values(), loaded.model.state_dict().values())
    )
    # compare in the same mode: frozen + eval takes nn.MultiheadAttention's fused fast path,
    # which rounds differently (~1e-6) from the training path
    try:
        assert outputs_equal(encoder.frozen().encode(prompts), loaded.encode(prompts))
    finally:
        encoder.requires_grad_(True).train()
    assert loaded.source == str(run)


def test_run_directory_prefers_ema_weights_when_meta_says_so(encoder, tmp_path):
    run = write_text_run(tmp_path / "text", encoder.model)
    ema = {k: v.detach().clone().contiguous() + 1.0 for k, v in encoder.model.state_dict().items()}
    ckpt.amend(run, {ckpt.EMA: ema})
    scale = encoder.model.logit_scale.detach()
    assert torch.equal(load_text_encoder(run).model.logit_scale, scale)  # meta says no EMA
    ckpt.amend(run, meta={"ema": True})
    assert torch.equal(load_text_encoder(run).model.logit_scale, scale + 1.0)


def test_run_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_text_encoder(tmp_path)
    run = tmp_path / "ae"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"stage": "autoencoder", "format_version": 1}))
    with pytest.raises(CheckpointError) as info:
        load_text_encoder(run)
    assert str(info.value) == (
        f"{run} is a 'autoencoder' run, not a 'text' run; "
        "pass the output directory of `latentdiff train text` "
        "(or a pretrained open_clip model: openclip:MODEL:PRETRAINED)"
    )


def test_shipped_configs_are_valid_and_registered_with_open_clip():
    from latentdiff.text.model import our_model_names, register_configs

    assert {"clip-tiny", "clip-base"} <= set(our_model_names())
    register_configs()
    for name in our_model_names():
        config = load_model_config(name)
        assert open_clip.get_model_config(name) == config
        assert config["text_cfg"]["vocab_size"] >= open_clip.SimpleTokenizer().vocab_size


def test_config_errors_name_the_key():
    config = load_model_config("clip-tiny")
    config["text_cfg"]["widht"] = 64
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['widht'\] in text_cfg"):
        build_clip(config)
    with pytest.raises(ValueError, match="unknown model config"):
        load_model_config("clip-enormous")


# ---- loss and metrics --------------------------------------------------------------------------


class _KnownEncoder:
    """Stands in for TextEncoder: class k's prompt embeds to e_k, an image to its pixel at (0, 0)."""

    device = torch.device("cpu")

    def __init__(self, class_names):
        self.class_names = class_names

    def encode(self, prompts):
        index = torch.tensor([self.class_names.index(p.split()[-1]) for p in prompts])
        B = len(prompts)
        pooled = F.one_hot(index, len(self.class_names)).float()  # (B, K)
        return TextOutput(states=torch.zeros(B, 1, 1), mask=torch.ones(B, 1, dtype=torch.bool), pooled=pooled)

    def encode_image(self, images, normalize=False):
        emb = images[:, :, 0, 0]
        return F.normalize(emb, dim=-1) if normalize else emb


def test_zero_shot_accuracy_on_known_embeddings():
    names = ["circle", "square", "star"]
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)  # reader batches: uint8, -1 after conversion
    images[0, 0, 0, 0] = 255  # circle
    images[1, 1, 0, 0] = 240  # square
    images[2, 2, 0, 0] = 200  # star
    images[3, 0, 0, 0] = 240  # looks like a circle but is labelled square
    batches = [
        {"image": images[:2], "caption": ["", ""], "meta": [{"label": 0}, {"label": "square"}]},
        {"image": images[2:], "caption": ["", ""], "meta": [{"label": 2}, {"label": 1}]},
    ]
    assert zero_shot_accuracy(_KnownEncoder(names), batches, names, lambda c: f"a {c}") == 0.75


def test_zero_shot_accuracy_runs_on_the_real_encoder(encoder):
    batch = {
        "image": torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8),
        "caption": ["", "", ""],
        "meta": [{"label": i} for i in range(3)],
    }
    acc = zero_shot_accuracy(encoder, [batch], ["circle", "square", "star"], lambda c: [f"a {c}", f"a photo of a {c}"])
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)


def test_retrieval_metrics_on_known_embeddings():
    n, e = 8, 16
    text = torch.linalg.qr(torch.randn(e, n, generator=torch.Generator().manual_seed(3)))[0].T  # (n, e) orthonormal
    perfect = retrieval_metrics(text * 3.0, text)  # scale does not matter: embeddings are normalised
    assert perfect == {"i2t_top1": 1.0, "t2i_top1": 1.0, "i2t_top5": 1.0, "t2i_top5": 1.0}
    # image i leans towards text i + 1 over its own text i: every match at rank 1
    shifted = retrieval_metrics(text.roll(-1, dims=0) + 0.5 * text, text)
    assert shifted == {"i2t_top1": 0.0, "t2i_top1": 0.0, "i2t_top5": 1.0, "t2i_top5": 1.0}
    # two images swapped: 6 of 8 still right in both directions
    swapped = text.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert retrieval_metrics(swapped, text)["i2t_top1"] == 0.75
    assert retrieval_metrics(swapped, text)["t2i_top1"] == 0.75
    # ties count against the model
    same = torch.ones(n, e)
    assert retrieval_metrics(same, same)["i2t_top1"] == 0.0


def test_retrieval_metrics_refuse_nan_embeddings():
    emb = torch.randn(4, 8)
    emb[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(emb, torch.randn(4, 8))


def test_retrieval_counts_repeated_captions_as_matches():
    # Two pairs share a caption; image 1 is closest to text 0 (same caption): a hit with captions given.
    text = torch.eye(3)
    image = torch.tensor([[1.0, 0, 0], [1.0, 0.1, 0], [0, 0, 1.0]])
    plain = retrieval_metrics(image, text)
    shared = retrieval_metrics(image, text, captions=["a bag", "a bag", "a coat"])
    assert plain["i2t_top1"] < 1.0
    assert shared["i2t_top1"] == 1.0 and shared["t2i_top1"] == 1.0


def test_image_to_text_top5_counts_distinct_captions():
    # 4 caption texts, each repeated 5 times (20 pairs, as Fashion-MNIST's templates repeat). Every
    # image scores the captions of class (c + 1) % 4 highest, then (c + 2), then (c + 3), then its
    # own: its own caption is the 4th distinct text, so top-1 misses and top-5 hits. Counting every
    # copy, 15 wrong captions would outscore it and top-5 would equal top-1 (= 0).
    classes = torch.arange(4).repeat_interleave(5)  # (20,) caption class of pair i
    captions = [f"a photo of class {c}" for c in classes.tolist()]
    text = torch.eye(4)[classes]  # (20, 4): copies of one caption embed the same
    preference = torch.tensor([1.0, 0.9, 0.8, 0.7])  # scores for own+1, own+2, own+3, own (cyclic)
    image = torch.stack([torch.tensor([preference[(j - c - 1) % 4] for j in range(4)]) for c in classes.tolist()])
    out = retrieval_metrics(image, text, ks=(1, 3, 4, 5), captions=captions)
    assert out["i2t_top1"] == 0.0 and out["i2t_top3"] == 0.0
    assert out["i2t_top4"] == 1.0 and out["i2t_top5"] == 1.0
    # text -> image still ranks the 20 images: the best own-class image has 15 wrong images above it.
    assert out["t2i_top5"] == 0.0
