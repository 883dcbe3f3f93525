"""TextEncoder: prompts -> per-token states c (B, T, D) for the prior's cross-attention, and CLIP embeddings.

Wraps an open_clip.CLIP and its SimpleTokenizer. The per-token states are open_clip's own text
forward stopped after ln_final (CLIP.encode_text before pooling); `pooled` continues exactly as
encode_text does (text_global_pool, then text_projection), so it equals model.encode_text(tokens).

A frozen encoder can keep the states of recent prompts (`frozen(cache_size=N)`), for the prompts a
run sees again and again: class captions, the sampling prompts, "" for guidance. A batch in which
every prompt is cached is stacked from the cache and encodes nothing; any other batch has its new prompts
encoded in one call, and a cached prompt keeps the states it was first given (so its states do not
depend on the prompts that share its batch). Real captions are all
distinct, so there a cache would only cost lookups, copies and memory: the cache judges itself over
the first N prompts looked up (one fill) and switches itself off when, in the second half of that
trial (the first half fills it), fewer than half the batches were served from it (`cache_summary()`).

TextEncoderConfig says which states, which padding and which mask: the defaults are this
project's (last layer, zero padding, attend up to EOT); Stable Diffusion's text encoders use the
settings `SD1` (OpenAI CLIP ViT-L/14: last layer, padded with EOT, all 77 positions attended) and
`SD2` (OpenCLIP ViT-H/14: penultimate layer then ln_final, padded with 0, all positions attended).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    # Each prompt's attended positions (= mask.sum(1): SOT..EOT, or T with attend="all") known on the host, so
    # cutting the states to the longest needs no device read; None where only device tensors were given.
    lengths: tuple[int, ...] | None = None

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
        # prompt -> (states (T, D), mask (T,), pooled (E,), length), least recently used first
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._cache_size = 0
        self._trial = _CacheTrial(0)
        self.tokenized = 0  # prompts tokenised by this encoder (batches served from the cache are not)
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
        return self._to_device(self._host_tokens(prompts)[0])

    def _host_tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """`tokenize`'s ids (B, T), still on the CPU, and each prompt's real tokens (SOT..EOT)."""
        prompts = check_prompts(prompts)
        tokens, truncated, lengths = encode_prompts(self.tokenizer, prompts, self.context_length)
        if self.settings.pad == "end":
            eot = self.tokenizer.eot_token_id
            after_eot = (tokens == eot).int().cumsum(dim=1) > 0  # (B, T): EOT and everything after it
            tokens = tokens.masked_fill(after_eot, eot)
        self.tokenized += len(prompts)
        if truncated:
            if not self.truncated:
                message = truncation_message(truncated, len(prompts), self.context_length)
                warnings.warn(f"{message}. Warned once: later truncated prompts are counted "
                              "(TextEncoder.truncation_summary())", PromptTruncatedWarning, stacklevel=3)  # fmt: skip
            self.truncated += len(truncated)
        return tokens, lengths

    def _to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        """Host ids to the encoder's device without stalling the host: from pinned memory on CUDA."""
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        return tokens.to(self.device, non_blocking=True)

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
        mask = self.word_mask(tokens, ends=True)  # (B, T): SOT..EOT
        if self.settings.attend == "all":
            mask = torch.ones_like(mask)
        return TextOutput(states=states, mask=mask, pooled=pooled)

    def word_mask(self, tokens: torch.Tensor, ends: bool = False) -> torch.Tensor:
        """(B, T) bool for token ids (B, T): True at the words, between SOT and the first EOT; ends=True: SOT..EOT."""
        eot_pos = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=-1)  # (B,) first EOT
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]  # (1, T)
        if ends:
            return positions <= eot_pos[:, None]
        return (positions >= 1) & (positions < eot_pos[:, None])

    def forward(self, prompts: Sequence[str]) -> TextOutput:
        """Encode prompts (differentiable). "" is the unconditional prompt: just SOT, EOT."""
        prompts = check_prompts(prompts)
        if not prompts:
            return self._empty()
        host, lengths = self._host_tokens(prompts)
        if self.settings.attend == "all":  # every position is attended: none may be cut
            lengths = (self.context_length,) * len(prompts)
        return replace(self.forward_tokens(self._to_device(host)), lengths=lengths)

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the prior's backward pass
    def encode(self, prompts: Sequence[str]) -> TextOutput:
        """Encode prompts without autograd, for frozen use by later stages, through the cache while it is on.

        With the cache on, states and pooled come in the parameters' dtype (inside autocast too), so
        batches from the cache and from the network look alike. Works inside torch.inference_mode()
        too; the outputs can feed a trainable network.
        """
        prompts = check_prompts(prompts)
        if not prompts or not self.cache_on():
            return self.forward(prompts)
        rows = [self._cache.get(p) for p in prompts]
        for p in prompts:
            if p in self._cache:
                self._cache.move_to_end(p)
        if all(r is not None for r in rows):
            self._trial.record(len(prompts), served=True)
            # torch.stack copies, so a caller editing the result cannot corrupt the cache.
            stacked = (torch.stack([r[i] for r in rows]) for i in range(3))  # (B, T, D), (B, T), (B, E)
            return TextOutput(*stacked, lengths=tuple(r[3] for r in rows))
        # The prompts not cached, each once, in one call; a cached prompt keeps the row it was first given, so
        # its states do not depend on which prompts share its batch (matrix products are not batch-invariant).
        missing = list(dict.fromkeys(p for p, r in zip(prompts, rows) if r is None))
        new = self.forward(missing)
        new = TextOutput(new.states.to(self.dtype), new.mask, new.pooled.to(self.dtype), new.lengths)
        for i, p in enumerate(missing):  # clone: a view would keep the whole batch alive
            self._cache[p] = (new.states[i].clone(), new.mask[i].clone(), new.pooled[i].clone(), new.lengths[i])
        if len(missing) == len(prompts):
            out = new  # a batch of distinct new prompts (real captions): no rows to gather
        else:
            rows = [self._cache[p] for p in prompts]
            stacked = (torch.stack([r[i] for r in rows]) for i in range(3))
            out = TextOutput(*stacked, lengths=tuple(r[3] for r in rows))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        self._trial.record(len(prompts), served=False)
        if self._trial.verdict is False:
            self.clear_cache()  # the memory goes back at once
        return out

    @torch.no_grad()
    def encode_each(self, prompts: Sequence[str]) -> TextOutput:
        """`encode` with every distinct prompt in a forward of its own (batch 1), rows in the order given.

        A prompt's states then depend neither on the prompts that share its call nor on the cache (matrix
        products are not batch-invariant, and a cached row may come from a training batch). Sampling uses
        it, so that an image remade alone (`--from-png`, a preview's recorded command) equals the one made
        in a batch: under bf16 a last-bit difference in the states can move a pixel by a level. One forward
        per distinct prompt.
        """
        prompts = check_prompts(prompts)
        if not prompts:
            return self.forward(prompts)
        alone = {p: self.forward([p]) for p in dict.fromkeys(prompts)}
        rows = [alone[p] for p in prompts]
        return TextOutput(
            states=torch.cat([r.states for r in rows]),
            mask=torch.cat([r.mask for r in rows]),
            pooled=torch.cat([r.pooled for r in rows]),
            lengths=tuple(n for r in rows for n in r.lengths),
        )

    def _empty(self) -> TextOutput:
        T, dev = self.context_length, self.device
        return TextOutput(
            states=torch.zeros(0, T, self.width, device=dev, dtype=self.dtype),
            mask=torch.zeros(0, T, dtype=torch.bool, device=dev),
            pooled=torch.zeros(0, self.embed_dim, device=dev, dtype=self.dtype),
            lengths=(),
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

        The cache starts a trial of `cache_size` prompts and stays on only where it serves (module
        docstring). It assumes the weights no longer change: it is bypassed while any parameter
        requires grad and cleared by .to()/.half() and load_state_dict; after editing parameters
        in place (e.g. copying EMA weights) call clear_cache().
        """
        self.requires_grad_(False).eval()
        self.clear_cache()
        self._cache_size = int(cache_size)
        self._trial = _CacheTrial(self._cache_size)
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    def cache_on(self) -> bool:
        """Whether `encode` goes through the cache now: one was asked for, the weights are frozen, and it
        has not switched itself off after its trial."""
        return (
            self._cache_size > 0
            and self._trial.verdict is not False
            and not any(p.requires_grad for p in self.parameters())
        )

    def cache_summary(self) -> str | None:
        """How the cache did, one line, e.g. "text cache off after its trial of 4096 prompts: 0 of 32 batches
        ..."; None when there is no cache."""
        return self._trial.summary() if self._cache_size > 0 else None

    def _apply(self, fn, recurse=True):
        self.clear_cache()  # device/dtype moves would leave cached tensors behind
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()  # runs for load_state_dict on this module or on any module holding it
        return super()._load_from_state_dict(*args, **kwargs)


@dataclass
class _CacheTrial:
    """Whether a prompt cache pays, judged once over its first `size` prompts looked up.

    A batch is encoded whole unless every prompt is cached, so only fully cached batches save
    anything: the verdict is the share of those among the batches judged, the ones begun in the
    trial's second half (the first half fills the cache) but never the first batch (it cannot hit).
    The trial ends once `size` prompts were looked up and at least one batch was judged.
    """

    size: int  # prompts looked up before the verdict (the cache's size: one fill)
    lookups: int = 0  # prompts looked up so far
    batches: int = 0
    served: int = 0  # batches whose every prompt was cached
    judged: int = 0  # batches begun in the trial's second half
    judged_served: int = 0
    verdict: bool | None = None  # None while the trial runs; then whether the cache stays on

    def record(self, prompts: int, served: bool) -> None:
        if self.verdict is None and self.batches > 0 and self.lookups >= self.size / 2:
            self.judged += 1
            self.judged_served += served
        self.lookups += prompts
        self.batches += 1
        self.served += served
        if self.verdict is None and self.lookups >= self.size and self.judged:
            self.verdict = 2 * self.judged_served >= self.judged

    def summary(self) -> str:
        share = f"{self.served} of {self.batches} batches were served from it"
        if self.verdict is None:
            return f"text cache on trial ({self.lookups} of {self.size} prompts looked up): {share}"
        if self.verdict:
            return f"text cache on: {share}"
        return (
            f"text cache off after its trial of {self.size} prompts: {self.judged_served} of {self.judged} batches "
            "in its second half were served from it (fewer than half; distinct captions); every batch is encoded "
            "in one call"
        )
