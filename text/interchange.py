"""CLIP text towers across the border: transformers' CLIPTextModel <-> open_clip, and Stable Diffusion's in.

Stable Diffusion conditions on CLIP's text tower only (Rombach et al. 2022, sec. 4.3):
- SD 1.x: OpenAI CLIP ViT-L/14 (quick_gelu), token states of the last layer after the final
  layer norm; prompts padded with the end-of-text id; all 77 positions attended.
- SD 2.x: OpenCLIP ViT-H/14 (gelu), token states of the penultimate layer, then the final layer
  norm; prompts padded with 0; all 77 positions attended. diffusers stores this tower with its last
  layer dropped (num_hidden_layers 23), so there its last layer *is* open_clip's penultimate one.

Both become open_clip.CLIP text towers (no image tower: SD keeps none) in a TextEncoder whose
TextEncoderConfig carries the family's layer, padding and mask. Sources:
- a diffusers `text_encoder/` folder (or the pipeline folder above it): transformers' config.json
  and model.safetensors / pytorch_model.bin (or shards with their index);
- a single-file SD checkpoint: `cond_stage_model.transformer.` (1.x, transformers' names) or
  `cond_stage_model.model.` (2.x, open_clip's names), built from open_clip's own ViT-L-14-quickgelu
  and ViT-H-14 configs.
Every file is read by core.safe_load (a pickle only with weights_only=True).

Tensor names, transformers CLIPTextModel (under `text_model.` in files written by transformers 4)
-> open_clip CLIP, block i:
    embeddings.token_embedding.weight              token_embedding.weight
    embeddings.position_embedding.weight           positional_embedding
    encoder.layers.i.layer_norm1 / layer_norm2     transformer.resblocks.i.ln_1 / ln_2
    encoder.layers.i.self_attn.{q,k,v}_proj        transformer.resblocks.i.attn.in_proj_{weight,bias}, rows q;k;v
    encoder.layers.i.self_attn.out_proj            transformer.resblocks.i.attn.out_proj
    encoder.layers.i.mlp.fc1 / fc2                 transformer.resblocks.i.mlp.c_fc / c_proj
    final_layer_norm                               ln_final
    text_projection.weight (E, D) (WithProjection) text_projection (D, E), transposed

Export writes the transformers layout (config.json + model.safetensors under `text_model.`, which
transformers 4 and 5, diffusers, ComfyUI and AUTOMATIC1111 all read) and a CLIPTokenizer folder
built from the BPE merges open_clip ships, so no file is downloaded either way.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from safetensors.torch import save_file

from latentdiff.core.checkpoint import CheckpointError
from latentdiff.core.safe_load import read_tensor_file

from .encoder import SD1, SD2, TextEncoder, TextEncoderConfig
from .model import build_clip, load_clip_state, validate_model_config
from .tokens import build_tokenizer

Family = Literal["sd1", "sd2"]
HF_PREFIX = "text_model."  # transformers 4's CLIPTextModel names its tensors text_model.*; 5 drops it
SINGLE_FILE_PREFIXES: dict[str, Family] = {"cond_stage_model.transformer.": "sd1", "cond_stage_model.model.": "sd2"}
# open_clip's own configs of the two towers; SD 1.x's keeps no text projection (transformers' CLIPTextModel has none).
FAMILY_CONFIGS: dict[Family, str] = {"sd1": "ViT-L-14-quickgelu", "sd2": "ViT-H-14"}
FAMILY_SETTINGS: dict[Family, TextEncoderConfig] = {"sd1": SD1, "sd2": SD2}
HF_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
HF_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # transformers' hidden_act -> open_clip's quick_gelu
_LN_EPS = 1e-5  # torch's (and so open_clip's) LayerNorm eps
# open_clip's <start_of_text>/<end_of_text> (49406/49407) are transformers' <|startoftext|>/<|endoftext|>.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_TOKENS = {"end": EOS, "zero": "!"}  # TextEncoderConfig.pad -> the token a CLIPTokenizer pads with (id 49407 / 0)
# A text run can only be refused in terms a user sees; these are open_clip text_cfg switches that change
# the network in ways transformers' CLIPTextModel has no field for.
_NOT_IN_HF = ("ls_init_value", "embed_cls", "act_kwargs", "qk_norm", "scaled_cosine_attn", "scale_heads",
              "scale_attn_inner", "scale_attn", "scale_fc", "hf_model_name", "hf_tokenizer_name")  # fmt: skip


# ---- configs ---------------------------------------------------------------------------------


def openclip_config(hf: dict[str, Any], *, projection: bool = False, where: str = "config.json") -> dict[str, Any]:
    """An open_clip model config (text tower only) from transformers' CLIPTextConfig dict.

    projection: the weights carry a text projection (CLIPTextModelWithProjection). Raises
    ValueError (one line) for what open_clip's text transformer cannot be: another activation
    than quick_gelu/gelu, an MLP width that is not int(width * ratio).
    """
    act = hf.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {act!r} has no open_clip text tower; it knows {sorted(_ACTIVATIONS)}")
    width, mlp = int(hf["hidden_size"]), int(hf["intermediate_size"])
    if int(width * (mlp / width)) != mlp:  # open_clip builds the MLP as int(width * mlp_ratio)
        raise ValueError(f"{where}: intermediate_size {mlp} is not int({width} * ratio) for any float ratio")
    text_cfg: dict[str, Any] = {
        "context_length": int(hf.get("max_position_embeddings", 77)),
        "vocab_size": int(hf.get("vocab_size", 49408)),
        "width": width,
        "heads": int(hf["num_attention_heads"]),
        "layers": int(hf["num_hidden_layers"]),
        "mlp_ratio": mlp / width,
    }
    if not projection:
        text_cfg["proj_type"] = "none"
    eps = float(hf.get("layer_norm_eps", _LN_EPS))
    if eps != _LN_EPS:
        text_cfg["norm_kwargs"] = {"eps": eps}
    return {
        "embed_dim": int(hf.get("projection_dim", width)) if projection else width,
        "quick_gelu": _ACTIVATIONS[act],
        # Never built (image_tower=False); only there because an open_clip config has one.
        "vision_cfg": {"image_size": 1, "patch_size": 1, "width": 8, "head_width": 8, "layers": 0},
        "text_cfg": text_cfg,
    }


def family_config(family: Family) -> dict[str, Any]:
    """open_clip's own config of SD's text tower (ViT-L-14-quickgelu, ViT-H-14), SD 1.x's without a projection."""
    config = open_clip.get_model_config(FAMILY_CONFIGS[family])
    if family == "sd1":  # OpenAI's projection is not in SD 1.x checkpoints: pooled = the EOT state
        config = {**config, "text_cfg": {**config["text_cfg"], "proj_type": "none"}}
    return validate_model_config(config, where=f"open_clip config {FAMILY_CONFIGS[family]}")


def hf_config(model_config: dict[str, Any], layers: int | None = None) -> dict[str, Any]:
    """transformers' CLIPTextConfig dict for an open_clip text tower, or ValueError naming what it cannot express.

    layers: how many blocks to export (default all); SD 2.x's penultimate layer exports as one fewer.
    """
    validate_model_config(model_config)
    text = model_config["text_cfg"]
    for key in _NOT_IN_HF:
        if text.get(key):
            raise ValueError(f"text_cfg.{key} = {text[key]!r}: transformers' CLIPTextModel has no such setting")
    if text.get("no_causal_mask"):
        raise ValueError("text_cfg.no_causal_mask: transformers' CLIPTextModel always applies a causal mask")
    if text.get("block_type") not in (None, "default"):
        raise ValueError(f"text_cfg.block_type {text['block_type']!r}: transformers' CLIPTextModel has default blocks")
    norm = dict(text.get("norm_kwargs") or {})
    eps = norm.pop("eps", _LN_EPS)
    if norm:
        raise ValueError(f"text_cfg.norm_kwargs {sorted(norm)}: transformers' CLIPTextModel's norms take eps only")
    width = int(text.get("width", 512))
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": int(width * float(text.get("mlp_ratio", 4.0))),
        "num_attention_heads": int(text.get("heads", 8)),
        "num_hidden_layers": int(layers if layers is not None else text.get("layers", 12)),
        "max_position_embeddings": int(text.get("context_length", 77)),
        "vocab_size": int(text.get("vocab_size", 49408)),
        "hidden_act": "quick_gelu" if model_config.get("quick_gelu") else "gelu",  # nn.GELU is the exact (erf) GELU
        "layer_norm_eps": float(eps),
        "projection_dim": int(model_config["embed_dim"]),
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 49406,
        "eos_token_id": 49407,  # not 2: transformers then pools at the first EOT, as open_clip's argmax does
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


# ---- tensors ---------------------------------------------------------------------------------


def from_hf(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """open_clip text-tower tensors from transformers' CLIPTextModel(WithProjection) tensors.

    Accepts the names with or without `text_model.`; drops the position_ids buffer older
    transformers saved. CheckpointError (one line) names a tensor of another model.
    """
    state = {k.removeprefix(HF_PREFIX): v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    out: dict[str, torch.Tensor] = {}
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        attn = [f"{src}self_attn.{p}_proj" for p in "qkv"]
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{name}.{kind}", None) for name in attn]
            if any(p is None for p in parts):
                missing = [f"{name}.{kind}" for name, p in zip(attn, parts, strict=True) if p is None]
                raise CheckpointError(f"{where}: {', '.join(missing)} missing; a CLIP attention needs q, k and v")
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(parts)  # nn.MultiheadAttention's rows: q; k; v
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
            for kind in ("weight", "bias"):
                if f"{src}{a}.{kind}" in state:
                    out[f"{dst}{b}.{kind}"] = state.pop(f"{src}{a}.{kind}")
    renames = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    for a, b in renames.items():
        if a in state:
            out[b] = state.pop(a)
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()  # (E, D) Linear -> (D, E) x @ P
    if state:
        extra = sorted(state)
        raise CheckpointError(
            f"{where}: {len(extra)} tensor(s) that are not a CLIP text tower's ({', '.join(extra[:3])})"
        )
    return out


def to_hf(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel tensors (names under `text_model.`) from an open_clip CLIP's, blocks [0, layers).

    The text projection, logit scale and image tower are not part of a CLIPTextModel and are left out.
    """
    out = {
        "embeddings.token_embedding.weight": state["token_embedding.weight"],
        "embeddings.position_embedding.weight": state["positional_embedding"],
        "final_layer_norm.weight": state["ln_final.weight"],
        "final_layer_norm.bias": state["ln_final.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.in_proj_{kind}"].chunk(3)
            out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                        f"{dst}self_attn.v_proj.{kind}": v})  # fmt: skip
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
    # Own contiguous copies: chunk() gives views that safetensors refuses to save as shared memory.
    return {HF_PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


# ---- reading sources -------------------------------------------------------------------------


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a transformers model folder: one weights file, or the shards an index lists."""
    for name in HF_WEIGHTS:
        if (folder / name).is_file():
            return read_tensor_file(folder / name, f"a CLIP text encoder ({folder})")
    for name in HF_SHARD_INDEXES:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_tensor_file(folder / shard, f"a shard of the CLIP text encoder in {folder}"))
            return state
    looked = ", ".join(HF_WEIGHTS + HF_SHARD_INDEXES)
    raise FileNotFoundError(f"{folder} has no CLIP text encoder weights (looked for {looked})")


def _tokenizer_pad(folder: Path) -> Literal["end", "zero"] | None:
    """The padding a diffusers pipeline's tokenizer/ uses (SD 1.x: <|endoftext|>, SD 2.x: "!"), if it has one."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is None:
                continue
            for setting, token in PAD_TOKENS.items():
                if pad == token:
                    return setting  # type: ignore[return-value]
            raise ValueError(f"{path}: pad_token {pad!r}; SD pads with {EOS!r} (1.x) or '!' (2.x)")
    return None


def read_diffusers(folder: str | Path) -> TextEncoder:
    """The text encoder of a diffusers pipeline folder (its text_encoder/) or of a text_encoder/ folder itself.

    Settings are what diffusers' StableDiffusionPipeline computes: the folder's last layer (SD 2.x
    folders already end at open_clip's penultimate one), all positions attended, padding from the
    sibling tokenizer/ (else by the activation: quick_gelu is OpenAI's CLIP, padded with EOT).
    Raises FileNotFoundError naming a missing file, ValueError / CheckpointError in one line.
    """
    folder = Path(folder)
    if (folder / "text_encoder").is_dir():
        folder = folder / "text_encoder"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: expected a diffusers text_encoder/ folder")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") not in (None, "clip_text_model"):
        raise ValueError(f"{config_path}: model_type {hf['model_type']!r}, not a CLIP text model (clip_text_model)")
    state = from_hf(_read_hf_weights(folder), str(folder))
    model_config = openclip_config(hf, projection="text_projection" in state, where=str(config_path))
    pad = _tokenizer_pad(folder.parent / "tokenizer") or ("end" if model_config["quick_gelu"] else "zero")
    settings = TextEncoderConfig(layer="last", pad=pad, attend="all")
    return _encoder(model_config, state, settings, f"{folder} does not fit its config.json", str(folder))


def read_single_file(
    path: str | Path, state: dict[str, torch.Tensor] | None = None, model_config: dict[str, Any] | None = None
) -> TextEncoder:
    """The text encoder of a single-file SD 1.x / 2.x checkpoint (`state`: its tensors, if already read).

    SD 1.x keeps transformers' names under cond_stage_model.transformer., SD 2.x open_clip's under
    cond_stage_model.model. (all 24 blocks: the penultimate one is read). The tower is the family's
    open_clip config (`family_config`) unless `model_config` names a smaller one of the same layout
    (tests). SDXL and others are refused; tensors that do not fit are named (CheckpointError).
    """
    path = Path(path)
    state = read_tensor_file(path, "a Stable Diffusion checkpoint") if state is None else state
    family = None
    for prefix, fam in SINGLE_FILE_PREFIXES.items():
        if any(k.startswith(prefix) for k in state):
            family, tower = fam, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if family is None:
        if any(k.startswith("conditioner.embedders.") for k in state):
            raise ValueError(f"{path} is SDXL-style (conditioner.embedders.*): two text encoders are not supported")
        raise ValueError(f"{path} has no SD text encoder: no tensor under {' or '.join(SINGLE_FILE_PREFIXES)}")
    if family == "sd1":
        tower = from_hf(tower, f"{path} (cond_stage_model.transformer.)")
    model_config = model_config or family_config(family)
    refusal = f"{path} does not fit SD {family[-1]}.x's text encoder (open_clip {FAMILY_CONFIGS[family]})"
    return _encoder(model_config, tower, FAMILY_SETTINGS[family], refusal, str(path))


def _encoder(
    model_config: dict[str, Any], state: dict[str, torch.Tensor], settings: TextEncoderConfig, refusal: str, source: str
) -> TextEncoder:
    model = build_clip(model_config, image_tower=False)
    # A CLIPTextModel has no logit scale; keep the CLIP init value (it only scales image-text logits).
    state = {"logit_scale": model.logit_scale.detach().clone(), **state}
    load_clip_state(model, state, refusal)
    tokenizer = build_tokenizer(model_config)
    return TextEncoder(model, tokenizer, model_config=model_config, source=source, settings=settings)


# ---- export ----------------------------------------------------------------------------------


def export_text_encoder(encoder: TextEncoder, text_encoder_dir: str | Path, tokenizer_dir: str | Path) -> None:
    """Write `encoder` as a transformers CLIPTextModel folder and a CLIPTokenizer folder that diffusers loads.

    last_hidden_state of the written model equals `encoder`'s token states: a penultimate-layer
    encoder is written without its last block, as diffusers stores SD 2.x. The tokenizer pads as
    the encoder does. Raises ValueError (one line) for what a CLIPTextModel cannot express.
    Note that diffusers' pipeline attends to every position; an encoder with attend="to_end"
    produces the same states, but a prior trained with that mask reads fewer of them.
    """
    model, settings = encoder.model, encoder.settings
    if model.vocab_size != 49408 or encoder.tokenizer.vocab_size != 49408:
        raise ValueError(f"vocabulary of {model.vocab_size} ids: a CLIPTokenizer from open_clip's BPE file has 49408")
    layers = len(model.transformer.resblocks) - (1 if settings.layer == "penultimate" else 0)
    config = hf_config(encoder.model_config or {}, layers=layers)
    out = Path(text_encoder_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf(model.state_dict(), layers), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_clip_tokenizer(tokenizer_dir, pad=settings.pad, context_length=encoder.context_length)


def single_file_text(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """`encoder`'s tensors as a single-file SD checkpoint holds its text encoder (read back by read_single_file).

    Padded with EOT and read at the last layer: SD 1.x's names (cond_stage_model.transformer., transformers'
    CLIPTextModel under text_model.). Padded with 0: SD 2.x's (cond_stage_model.model., open_clip's), whose
    readers take the penultimate block; an encoder read at its last layer (an SD 2.x folder's, or one
    trained here) is written with a copy of its last block appended, so that penultimate block is its last
    (the copy changes only CLIP's pooled embedding, which SD does not read). Raises ValueError (one line)
    for a combination neither layout reads (EOT padding at the penultimate layer, attend = "to_end").
    """
    settings, state = encoder.settings, encoder.model.state_dict()
    if settings.attend != "all":
        raise ValueError(f'encoder.attend = "{settings.attend}": SD checkpoints are read attending to every position')
    blocks = len(encoder.model.transformer.resblocks)
    if settings.pad == "end":
        if settings.layer != "last":
            raise ValueError("EOT padding at the penultimate layer: SD 1.x's layout reads the last layer")
        return {"cond_stage_model.transformer." + k: v for k, v in to_hf(state, blocks).items()}
    tower = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if not k.startswith("visual.")}
    if settings.layer == "last":
        last = f"transformer.resblocks.{blocks - 1}."
        for key in [k for k in tower if k.startswith(last)]:
            tower[f"transformer.resblocks.{blocks}." + key[len(last) :]] = tower[key].clone()
    return {"cond_stage_model.model." + k: v for k, v in tower.items()}


def _bpe_merges() -> list[str]:
    """The merges open_clip's SimpleTokenizer reads from its BPE file (the same slice of lines, in order)."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


def write_clip_tokenizer(folder: str | Path, pad: Literal["end", "zero"] = "zero", context_length: int = 77) -> None:
    """A CLIPTokenizer folder (vocab.json, merges.txt, configs) from the BPE vocabulary open_clip ships.

    The ids are open_clip's: the 256 byte symbols, the same with </w>, one per merge, then
    <|startoftext|> 49406 and <|endoftext|> 49407. pad "end" pads with <|endoftext|> (SD 1.x),
    "zero" with "!" (id 0: open_clip's SimpleTokenizer and SD 2.x).
    """
    merges = _bpe_merges()
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    ids = {token: i for i, token in enumerate(vocab)}
    if len(ids) != len(vocab) or len(vocab) != 49408:
        raise ValueError(f"{default_bpe()} gives {len(ids)} distinct tokens, not CLIP's 49408")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD_TOKENS[pad]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
                        "do_lower_case": True, "errors": "replace", **special}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
