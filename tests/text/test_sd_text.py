"""Stable Diffusion's text encoders in (transformers / single-file layouts) and our CLIP out to transformers.

Small random-weight transformers CLIPTextModels (width 32, 2 layers, 4 heads, CLIP's vocabulary and
77 positions) stand in for SD 1.x's and 2.x's towers; nothing is downloaded. transformers is the
reference, so these tests need it installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.text.encoder import SD1, SD2, TextEncoder
from latentdiff.text.interchange import (
    export_text_encoder,
    family_config,
    from_hf,
    hf_config,
    openclip_config,
    read_diffusers,
    read_single_file,
    write_clip_tokenizer,
)
from latentdiff.text.model import build_clip, load_model_config
from latentdiff.text.sources import load_text_encoder
from latentdiff.text.tokens import build_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference these tests compare with")

# Punctuation and non-ASCII on which open_clip's tokenizer and transformers' agree. They differ, by design of
# each, on HTML entities and text ftfy repairs (open_clip unescapes "&amp;" and straightens ’ quotes), on
# "<|endoftext|>" typed in a prompt (plain text here), and, with SD 2.x's "!" pad token, on every "!".
PROMPTS = ["a photo of a cat", "", "a red circle, on the LEFT; (small) & blue?", "Größe naïve café 🐱 東京 'quoted'"]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _no_hub_kernels(monkeypatch):
    # transformers 5 asks for its optional `kernels` package in from_pretrained unless told not to.
    monkeypatch.setenv("USE_HUB_KERNELS", "0")


def small_hf(act: str, seed: int, projection: bool = False):
    """A random-weight CLIPTextModel(WithProjection) of SD's layout at width 32."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=49408, max_position_embeddings=77, hidden_act=act, projection_dim=24,
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def hf_states(model, tokens: torch.Tensor, layer: str) -> torch.Tensor:
    """SD 1.x reads last_hidden_state; SD 2.x the penultimate hidden state through final_layer_norm."""
    text_model = getattr(model, "text_model", model)  # CLIPTextModelWithProjection wraps the CLIPTextModel
    with torch.no_grad():
        out = text_model(tokens, output_hidden_states=True)
    return out.last_hidden_state if layer == "last" else text_model.final_layer_norm(out.hidden_states[-2])


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's tensors as transformers 4 wrote them (text_model.*), what SD folders hold."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}
    return {"text_model." + k: v for k, v in state.items()}


def pipeline_folder(tmp_path: Path, model, pad: str) -> Path:
    """A diffusers pipeline's text_encoder/ and tokenizer/ (only the parts the text encoder reads)."""
    folder = tmp_path / "pipe"
    (folder / "text_encoder").mkdir(parents=True)
    save_file(hf_state_dict(model), str(folder / "text_encoder" / "model.safetensors"))
    (folder / "text_encoder" / "config.json").write_text(model.config.to_json_string())
    write_clip_tokenizer(folder / "tokenizer", pad=pad)
    return folder


# ---- SD's encoders in ----------------------------------------------------------------------------


@pytest.mark.parametrize("act,pad", [("quick_gelu", "end"), ("gelu", "zero")])
def test_diffusers_folder_gives_transformers_token_states(tmp_path, act, pad):
    hf = small_hf(act, seed=1)
    encoder = read_diffusers(pipeline_folder(tmp_path, hf, pad)).frozen()
    assert encoder.settings.layer == "last" and encoder.settings.pad == pad and encoder.model.visual is None
    tokens = encoder.tokenize(PROMPTS)
    out = encoder.encode(PROMPTS)
    assert (out.states - hf_states(hf, tokens, "last")).abs().max() < TOL
    assert out.mask.all()  # SD attends to all 77 positions
    # The same ids as diffusers' tokenizer/ gives, padding included.
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tokens)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_gives_transformers_token_states(tmp_path, family):
    hf = small_hf("quick_gelu" if family == "sd1" else "gelu", seed=2, projection=family == "sd2")
    if family == "sd1":  # transformers' names, with the position_ids buffer older transformers saved
        tower = {f"cond_stage_model.transformer.{k}": v for k, v in hf_state_dict(hf).items()}
        tower["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # open_clip's names, as SD 2.x's FrozenOpenCLIPEmbedder saved them (logit_scale and all)
        state = from_hf(hf.state_dict(), "reference")
        tower = {f"cond_stage_model.model.{k}": v for k, v in {**state, "logit_scale": torch.tensor(4.6)}.items()}
    tower["model.diffusion_model.out.0.weight"] = torch.ones(4)  # the rest of a checkpoint is not read
    save_file(tower, str(tmp_path / "sd.safetensors"))
    config = openclip_config(hf.config.to_dict(), projection=family == "sd2")
    encoder = read_single_file(tmp_path / "sd.safetensors", model_config=config).frozen()
    assert encoder.settings == (SD1 if family == "sd1" else SD2)
    tokens = encoder.tokenize(PROMPTS)
    out = encoder.encode(PROMPTS)
    assert (out.states - hf_states(hf, tokens, encoder.settings.layer)).abs().max() < TOL
    if family == "sd2":  # the pooled embedding is CLIP's own: the full stack, then the projection
        with torch.no_grad():
            assert (out.pooled - hf(tokens).text_embeds).abs().max() < TOL


def test_padding_conventions():
    tokens = {}
    for name, settings in (("sd1", SD1), ("sd2", SD2)):
        config = openclip_config(small_hf("gelu", seed=3).config.to_dict())
        model = build_clip(config, image_tower=False)
        encoder = TextEncoder(model, build_tokenizer(config), config, settings=settings).frozen()
        tokens[name] = encoder.tokenize(["a cat", ""])
        assert encoder.encode(["a cat", ""]).mask.all()
    eot = 49407
    assert tokens["sd1"][0, :4].tolist() == [49406, 320, 2368, eot] and (tokens["sd1"][0, 3:] == eot).all()
    assert tokens["sd2"][0, :4].tolist() == [49406, 320, 2368, eot] and (tokens["sd2"][0, 4:] == 0).all()
    assert (tokens["sd1"][1, 1:] == eot).all() and tokens["sd2"][1, 1] == eot and (tokens["sd2"][1, 2:] == 0).all()


def test_sd_configs_are_open_clips_vit_l_and_vit_h():
    # transformers' configs of SD 1.5's and SD 2.1's text_encoder/ (diffusers keeps 23 of ViT-H's 24 blocks).
    sd15 = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    sd21 = {**sd15, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
            "num_hidden_layers": 23, "hidden_act": "gelu"}  # fmt: skip
    ours1, ours2 = openclip_config(sd15), openclip_config(sd21)
    vit_l, vit_h = family_config("sd1"), family_config("sd2")
    assert ours1["quick_gelu"] and not ours2["quick_gelu"] and vit_l["quick_gelu"] and not vit_h.get("quick_gelu")
    assert {**vit_l["text_cfg"], "mlp_ratio": 4.0} == ours1["text_cfg"]
    assert {**vit_h["text_cfg"], "mlp_ratio": 4.0, "layers": 23, "proj_type": "none"} == ours2["text_cfg"]


def test_refusals_name_what_does_not_fit(tmp_path):
    hf = small_hf("quick_gelu", seed=4)
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        openclip_config({**hf.config.to_dict(), "hidden_act": "gelu_new"})
    with pytest.raises(CheckpointError, match=r"not a CLIP text tower's \(vision_model.x\)"):
        from_hf({**hf_state_dict(hf), "vision_model.x": torch.zeros(1)}, "f")
    state = hf_state_dict(hf)
    state["text_model.final_layer_norm.weight"] = torch.ones(33)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    sd1 = {f"cond_stage_model.transformer.{k}": v for k, v in state.items()}
    config = openclip_config(hf.config.to_dict())
    with pytest.raises(CheckpointError, match=r"ln_final.weight is \(33,\), needs \(32,\)"):
        read_single_file(tmp_path / "x", state=sd1, model_config=config)
    with pytest.raises(ValueError, match="SDXL"):
        read_single_file(tmp_path / "x", state={"conditioner.embedders.0.transformer.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="no SD text encoder"):
        read_single_file(tmp_path / "x", state={"first_stage_model.x": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_diffusers(tmp_path)
    tiny = load_model_config("clip-tiny")
    for key, value in (("no_causal_mask", True), ("ls_init_value", 0.1)):
        with pytest.raises(ValueError, match=f"text_cfg.{key}"):
            hf_config({**tiny, "text_cfg": {**tiny["text_cfg"], key: value}})
    encoder = read_diffusers(pipeline_folder(tmp_path, hf, "end"))
    with pytest.raises(ValueError, match="no image tower"):
        encoder.encode_image(torch.zeros(1, 3, 8, 8))


# ---- out to transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("act,pad", [("quick_gelu", "end"), ("gelu", "zero")])
def test_transformers_ours_transformers_round_trip_is_bit_for_bit(tmp_path, act, pad):
    hf = small_hf(act, seed=5)
    folder = pipeline_folder(tmp_path, hf, pad)
    export_text_encoder(read_diffusers(folder), tmp_path / "out" / "text_encoder", tmp_path / "out" / "tokenizer")
    original, written = hf_state_dict(hf), load_file(str(tmp_path / "out" / "text_encoder" / "model.safetensors"))
    assert sorted(original) == sorted(written)
    assert all(torch.equal(original[k], written[k]) for k in original)
    config = json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                "max_position_embeddings", "vocab_size", "layer_norm_eps"):  # fmt: skip
        assert config[key] == hf.config.to_dict()[key], key
    for name in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).read_bytes() == (tmp_path / "out" / "tokenizer" / name).read_bytes()
    assert json.loads((tmp_path / "out" / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == (
        "<|endoftext|>" if pad == "end" else "!"
    )


def test_penultimate_layer_exports_as_diffusers_stores_sd2(tmp_path):
    hf = small_hf("gelu", seed=6, projection=True)
    state = {f"cond_stage_model.model.{k}": v for k, v in from_hf(hf.state_dict(), "reference").items()}
    config = openclip_config(hf.config.to_dict(), projection=True)
    encoder = read_single_file(tmp_path / "sd2.safetensors", state=state, model_config=config).frozen()
    export_text_encoder(encoder, tmp_path / "text_encoder", tmp_path / "tokenizer")
    exported = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    assert exported.config.num_hidden_layers == 1  # the last block is not part of SD 2.x's conditioning
    tokens = encoder.tokenize(PROMPTS)
    assert (encoder.encode(PROMPTS).states - hf_states(exported, tokens, "last")).abs().max() < TOL


def test_trained_clip_exports_to_clip_text_model_and_tokenizer(tmp_path, text_run):
    encoder = load_text_encoder(text_run[0])  # clip-tiny, trained here on the test shards
    export_text_encoder(encoder, tmp_path / "text_encoder", tmp_path / "tokenizer")
    model = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    prompts = [*PROMPTS, "a large red circle on the left", "x" * 300]
    length = encoder.context_length
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="truncated"):
        tokens = encoder.tokenize(prompts)
    assert torch.equal(ids, tokens)  # same ids as open_clip's tokenizer, "!"-padded (id 0)
    assert (encoder.encode(prompts).states - hf_states(model, tokens, "last")).abs().max() < TOL
    with pytest.raises(ValueError, match="text_cfg.no_causal_mask"):
        bad = {**encoder.model_config, "text_cfg": {**encoder.model_config["text_cfg"], "no_causal_mask": True}}
        export_text_encoder(TextEncoder(encoder.model, encoder.tokenizer, bad), tmp_path / "x", tmp_path / "y")


def test_a_text_run_keeps_the_sd_settings_and_no_image_tower(tmp_path):
    """What `import pipeline` will write: a text run of an SD tower reads back with its layer, padding and mask."""
    from latentdiff.core import checkpoint as ckpt
    from latentdiff.core.config import dumps_toml, to_dict
    from latentdiff.text.stage import TextStageConfig

    hf = small_hf("gelu", seed=7, projection=True)
    state = {f"cond_stage_model.model.{k}": v for k, v in from_hf(hf.state_dict(), "reference").items()}
    config = openclip_config(hf.config.to_dict(), projection=True)
    encoder = read_single_file(tmp_path / "sd2.safetensors", state=state, model_config=config).frozen()
    (tmp_path / "model.json").write_text(json.dumps(config))
    stage = TextStageConfig(model=str(tmp_path / "model.json"), encoder=encoder.settings, image_tower=False)
    run, meta = tmp_path / "run", {"stage": "text", "format_version": ckpt.FORMAT_VERSION, "step": 0, "ema": False}
    toml = dumps_toml(to_dict(stage))
    staging = ckpt.staging_dir(run, 0)
    ckpt.save_weights(staging / ckpt.MODEL, encoder.model.state_dict())
    for folder in (staging, run):
        ckpt.write_text(folder / ckpt.CONFIG, toml)
        ckpt.write_json(folder / ckpt.META, meta)
    ckpt.commit(run, staging, 0, keep=1)
    loaded = load_text_encoder(run)
    assert loaded.settings == SD2 and loaded.model.visual is None
    tokens = loaded.tokenize(PROMPTS)
    assert torch.equal(loaded.encode(PROMPTS).states, encoder.encode(PROMPTS).states)
    assert (loaded.encode(PROMPTS).states - hf_states(hf, tokens, "penultimate")).abs().max() < TOL
