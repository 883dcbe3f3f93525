"""TextEncoder: prompts -> per-token states c (B, T, D) for the prior's cross-attention, and CLIP embeddings.

Wraps an open_clip.CLIP and its SimpleTokenizer. The per-token states are open_clip's own text
forward stopped after ln_final (CLIP.encode_text before pooling); `pooled` continues exactly as
encode_text does (text_global_pool, then text_projection), so it equals model.encode_text(tokens).

TextEncoderConfig says which states, which padding and which mask: the defaults are this
project's (last layer, zero padding, attend up to EOT); Stable Diffusion's text encoders use the
settings `SD1` (OpenAI CLIP ViT-L/14: last layer, padded with EOT, all 77 positions attended) and
`SD2` (OpenCLIP ViT-H/14: penultimate layer then ln_final, padded with 0, all positions attended).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip import SimpleTokenizer
from open_clip.transformer import text_global_pool
from torch import nn

from latentdiff.text.model import preprocess_images
from latentdiff.text.tokens import PromptTruncatedWarning, check_prompts, encode_prompts, truncation_message


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which token states a TextEncoder hands on, and how prompts are padded and masked."""

    # Token states of the last transformer block, or of the one before it (SD 2.x, "penultimate"),
    # then ln_final either way. `pooled` is always CLIP's own (the full stack), so CLIP scores do not change.
    layer: Literal["last", "penultimate"] = "last"
    # Ids after EOT: 0 (open_clip's SimpleTokenizer, SD 2.x) or the EOT id again (OpenAI CLIP, SD 1.x).
    # The causal mask keeps padding out of the real tokens' states, but not out of the padding's own.
    pad: Literal["zero", "end"] = "zero"
    # The mask the prior's cross-attention uses: SOT..EOT ("to_end"), or every position (SD: "all").
    attend: Literal["to_end", "all"] = "to_end"


SD1 = TextEncoderConfig(layer="last", pad="end", attend="all")  # Stable Diffusion 1.x (OpenAI CLIP ViT-L/14)
SD2 = TextEncoderConfig(layer="penultimate", pad="zero", attend="all")  # Stable Diffusion 2.x (OpenCLIP ViT-H/14)


@dataclass(frozen=True)
class TextOutput:
    """What the text encoder gives later stages for a batch of B prompts."""

    states: torch.Tensor  # (B, T, D) token states of the configured layer, after ln_final
    mask: torch.Tensor  # (B, T) bool, True for SOT..EOT inclusive (real tokens), or all True (attend="all")
    pooled: torch.Tensor  # (B, E) projected embedding, = CLIP.encode_text; not normalised

    def normalized_pooled(self) -> torch.Tensor:
        """(B, E) unit-length pooled embeddings, as CLIP compares them."""
        return F.normalize(self.pooled, dim=-1)


class TextEncoder(nn.Module):
    """Text (and image) side of an open_clip CLIP, with the tokenizer that belongs to it."""

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: SimpleTokenizer,
        model_config: dict[str, Any] | None = None,
        source: str = "",
        settings: TextEncoderConfig = TextEncoderConfig(),
    ):
        super().__init__()
        if not isinstance(model, open_clip.CLIP):
            raise TypeError(
                f"TextEncoder needs an open_clip.CLIP (built-in text transformer), got {type(model).__name__}"
            )
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model's token embedding only "
                f"{model.vocab_size}; set text_cfg.vocab_size >= {tokenizer.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model_config  # open_clip config dict; saved with checkpoints that use this encoder
        self.source = source  # how it was loaded: "openclip:MODEL:PRETRAINED" or a run directory
        self.settings = settings
        if settings.layer == "penultimate" and len(model.transformer.resblocks) < 2:
            raise ValueError("layer='penultimate' needs a text transformer of 2 or more layers; this one has 1")
        self._cache: OrderedDict[str, tuple[torch.Tensor, int, torch.Tensor]] = OrderedDict()
        self._cache_size = 0
        self.tokenized = 0  # prompts tokenised by this encoder (cached prompts are tokenised once)
        self.truncated = 0  # of which longer than the context: warned about once, then counted

    # ---- sizes, device, dtype --------------------------------------------------------
    @property
    def width(self) -> int:
        """D, the width of the per-token states."""
        return self.model.transformer.width

    @property
    def embed_dim(self) -> int:
        """E, the width of the pooled, projected embedding."""
        proj = self.model.text_projection
        if proj is None:  # proj_type "none": the pooled state itself
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        """T, tokens per prompt including SOT and EOT."""
        return self.model.context_length

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.get_cast_dtype()

    # ---- text --------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, T) on the encoder's device; long prompts are truncated.

        The first batch with a truncated prompt warns (PromptTruncatedWarning, naming the
        prompts); later ones are only counted, so a training run warns once, not every batch.
        `truncation_summary()` gives the count.
        """
        prompts = check_prompts(prompts)
        tokens, truncated = encode_prompts(self.tokenizer, prompts, self.context_length)
        if self.settings.pad == "end":
            eot = self.tokenizer.eot_token_id
            after_eot = (tokens == eot).int().cumsum(dim=1) > 0  # (B, T): EOT and everything after it
            tokens = tokens.masked_fill(after_eot, eot)
        self.tokenized += len(prompts)
        if truncated:
            if not self.truncated:
                message = truncation_message(truncated, len(prompts), self.context_length)
                warnings.warn(f"{message}. Warned once: later truncated prompts are counted "
                              "(TextEncoder.truncation_summary())", PromptTruncatedWarning, stacklevel=2)  # fmt: skip
            self.truncated += len(truncated)
        return tokens.to(self.device)

    def truncation_summary(self) -> str | None:
        """ "12 of 6400 prompts were truncated to the context of 77 tokens", or None when none was."""
        if not self.truncated:
            return None
        return (
            f"{self.truncated} of {self.tokenized} prompts were truncated to the context of "
            f"{self.context_length} tokens"
        )

    def forward_tokens(self, tokens: torch.Tensor) -> TextOutput:
        """Per-token states, mask and pooled embedding for token ids (B, T) from `tokenize`."""
        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        # Same steps as open_clip CLIP.encode_text, kept apart so the states before pooling are visible.
        x = m.token_embedding(tokens).to(cast_dtype)  # (B, T, D)
        x = x + m.positional_embedding.to(cast_dtype)
        if self.settings.layer == "last":
            x = m.transformer(x, attn_mask=m.attn_mask)  # causal mask: padding after EOT never reaches real tokens
            states = final = m.ln_final(x)  # (B, T, D)
        else:  # SD 2.x: the states before the last block, through ln_final (FrozenOpenCLIPEmbedder, layer_idx=1)
            x, (before_last,) = m.transformer.forward_intermediates(
                x, attn_mask=m.attn_mask, indices=[len(m.transformer.resblocks) - 2]
            )
            states, final = m.ln_final(before_last), m.ln_final(x)  # (B, T, D) each
        pooled = text_global_pool(final, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            if isinstance(m.text_projection, nn.Linear):
                pooled = m.text_projection(pooled)
            else:
                pooled = pooled @ m.text_projection  # (B, E)
        eot_pos = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=-1)  # (B,) first EOT
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = positions[None, :] <= eot_pos[:, None]  # (B, T)
        if self.settings.attend == "all":
            mask = torch.ones_like(mask)
        return TextOutput(states=states, mask=mask, pooled=pooled)

    def forward(self, prompts: Sequence[str]) -> TextOutput:
        """Encode prompts (differentiable). "" is the unconditional prompt: just SOT, EOT."""
        prompts = check_prompts(prompts)
        if not prompts:
            return self._empty()
        return self.forward_tokens(self.tokenize(prompts))

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the prior's backward pass
    def encode(self, prompts: Sequence[str]) -> TextOutput:
        """Encode prompts without autograd, for frozen use by later stages; uses the LRU cache if enabled.

        Works inside torch.inference_mode() too; the outputs can feed a trainable network.
        """
        prompts = check_prompts(prompts)
        if not self._cache_active() or not prompts:
            return self.forward(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            out = self.forward(missing)
            lengths = out.mask.sum(dim=1).tolist()
            for i, p in enumerate(missing):
                # clone: a view would keep the whole batch alive until every row is evicted; one
                # dtype (the parameters'), so rows cached inside and outside autocast stack together
                row_states = out.states[i].to(self.dtype, copy=True)
                self._cache[p] = (row_states, lengths[i], out.pooled[i].to(self.dtype, copy=True))
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        # torch.stack copies, so a caller editing the result cannot corrupt the cache.
        states = torch.stack([r[0] for r in rows])
        lengths = torch.tensor([r[1] for r in rows], device=states.device)
        mask = torch.arange(self.context_length, device=states.device)[None, :] < lengths[:, None]
        pooled = torch.stack([r[2] for r in rows])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return TextOutput(states=states, mask=mask, pooled=pooled)

    def _empty(self) -> TextOutput:
        T, dev = self.context_length, self.device
        return TextOutput(
            states=torch.zeros(0, T, self.width, device=dev, dtype=self.dtype),
            mask=torch.zeros(0, T, dtype=torch.bool, device=dev),
            pooled=torch.zeros(0, self.embed_dim, device=dev, dtype=self.dtype),
        )

    # ---- images ------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, E) image embeddings for images (B, 3, H, W) in [-1, 1] (resized and normalised here)."""
        if self.model.visual is None:
            raise ValueError(
                f"the text encoder {self.source or ''} has no image tower (Stable Diffusion ships only CLIP's "
                "text tower): image embeddings and CLIP scores need a full CLIP, e.g. a `latentdiff train text` run"
            )
        return self.model.encode_image(preprocess_images(images, self.model), normalize=normalize)

    # ---- frozen use and the cache ------------------------------------------------------------
    def frozen(self, cache_size: int = 0) -> TextEncoder:
        """No gradients, eval mode; optionally cache the `cache_size` most recent prompts in `encode`.

        The cache assumes the weights no longer change: it is bypassed while any parameter
        requires grad and cleared by .to()/.half() and load_state_dict; after editing
        parameters in place (e.g. copying EMA weights) call clear_cache().
        """
        self.requires_grad_(False).eval()
        self.clear_cache()
        self._cache_size = int(cache_size)
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    def _cache_active(self) -> bool:
        return self._cache_size > 0 and not any(p.requires_grad for p in self.parameters())

    def _apply(self, fn, recurse=True):
        self.clear_cache()  # device/dtype moves would leave cached tensors behind
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()  # runs for load_state_dict on this module or on any module holding it
        return super()._load_from_state_dict(*args, **kwargs)
