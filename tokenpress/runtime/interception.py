"""Interception: the compressed forward installed on one model instance's inner module (the one that
merges image features into the text and runs the decoder) while a stack is attached. Three cases:

* **prefill** (images given, no compressed cache yet): one :class:`~tokenpress.runtime.prefill.Prefill`
  runs, and its outcome (what each stage did, token counts, trace) is stored on the handle;
* **decode** (a :class:`CompressedCache` from that prefill): new text tokens run through every
  layer against that layer's own cache; nothing is re-decided;
* anything else (text only, or a plain cache): the model's own forward, untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from tokenpress.core.errors import CompressionError
from tokenpress.runtime import compat
from tokenpress.runtime.cache import CompressedCache
from tokenpress.runtime.prefill import (
    Prefill,
    PrefillOutcome,
    PrefillStats,
    StageEntry,
    StageRecord,
    observed_runner,
    prompt_fingerprints,
)

if TYPE_CHECKING:
    from tokenpress.runtime.adapter import ModelAdapter
    from tokenpress.runtime.attach import Handle

__all__ = ["MEDIA_KEYS", "CompressedForward", "DeferredEncoding", "Prefill", "PrefillOutcome", "PrefillStats",
           "StageEntry", "StageRecord", "prompt_fingerprints"]


#: Keyword arguments of a model's forward that describe its images or videos.
MEDIA_KEYS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "video_grid_thw",
              "second_per_grid_ts", "batch_num_images", "image_sizes_videos")


class DeferredEncoding:
    """What ``get_*_features`` returns during ``generate()`` while attached: its arguments, to be
    encoded by the compressed prefill (``pooler_output`` is None so generate leaves it alone)."""

    pooler_output = None

    def __init__(self, encoder: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        self.encoder = encoder
        self.args = args
        self.kwargs = kwargs

    def inputs(self) -> dict[str, Any]:
        """The call's arguments by name (positional ones named from the encoder's signature)."""

        bound = inspect.signature(self.encoder).bind_partial(*self.args, **self.kwargs).arguments
        extra = bound.pop("kwargs", {})
        return {**bound, **extra}

    def materialize(self) -> Any:
        """The real encoder output (for the model's own forward)."""
        return self.encoder(*self.args, **self.kwargs)


class CompressedForward:
    """Callable installed as the inner module's ``forward`` while a stack is attached."""

    def __init__(self, handle: Handle, original_forward: Callable[..., Any]) -> None:
        self.handle = handle
        self.adapter: ModelAdapter = handle.adapter
        self.original_forward = original_forward
        self.entries: list[StageEntry] = handle.entries
        self.compact = handle.stack.positions == "compact"

    # --- dispatch -------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # The cache arrives as `cache` (transformers 5.24+) or `past_key_values`: take either.
        cached = compat.pop_cache(kwargs)
        past_key_values = past_key_values if past_key_values is not None else cached
        media = {key: kwargs[key] for key in (*MEDIA_KEYS, *self.adapter.extra_inputs)
                 if kwargs.get(key) is not None}
        if pixel_values is not None:
            media["pixel_values"] = pixel_values
        encoded = kwargs.get("mm_encoder_outputs") or {}
        deferred = {key: value for key, value in encoded.items() if isinstance(value, DeferredEncoding)}
        for value in deferred.values():
            media.update({key: v for key, v in value.inputs().items()
                          if key in (*MEDIA_KEYS, *self.adapter.extra_inputs) and v is not None})
        has_media = "pixel_values" in media or "pixel_values_videos" in media
        placeholders = self.adapter.placeholder_ids()
        cache_state = getattr(past_key_values, "tokenpress_state", None)

        if cache_state is not None:
            if has_media:
                raise CompressionError("new images on a cache of a compressed prompt are not supported; "
                                       "start a new conversation (no cache)")
            return self.decode(input_ids, inputs_embeds, attention_mask, past_key_values, kwargs)
        compressible = has_media and self.entries and (
            input_ids is None or bool(torch.isin(input_ids, torch.tensor(placeholders, device=input_ids.device)).any()))
        if not compressible:
            if deferred:  # let the model encode as usual
                kwargs["mm_encoder_outputs"] = {key: value.materialize() if isinstance(value, DeferredEncoding)
                                                else value for key, value in encoded.items()}
            kwargs[compat.cache_argument(self.adapter.inner_module())] = past_key_values
            return self.original_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                         position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        if encoded and not deferred:
            raise CompressionError("pass pixel_values rather than pre-computed mm_encoder_outputs while a "
                                   "compression stack is attached (the stages need the raw encoder)")
        if input_ids is None:
            raise CompressionError("a compressed forward needs input_ids (to find the image placeholders), "
                                   "not inputs_embeds")
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise CompressionError("images after an uncompressed cached prefix are not supported; "
                                   "pass no cache with the prompt that holds images")
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise CompressionError(f"{flag}=True is not available while a compression stack is attached")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(self.adapter.text_config, "use_cache", True))
        call = lambda: self.prefill(input_ids, attention_mask, use_cache, media)  # noqa: E731
        return self.handle.registry.plugin_manager.hook.tokenpress_prefill(
            adapter=self.adapter, batch_size=input_ids.shape[0], call=call)

    # --- prefill --------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, use_cache: bool,
                media: dict[str, Any]) -> Any:
        handle = self.handle
        run = Prefill(self.adapter, self.entries, observed_runner(handle.registry), compact=self.compact,
                      trace=handle.trace is not None)
        output, outcome = run.run(input_ids, attention_mask, use_cache, media, handle.prompt_length)
        handle.store(outcome)
        return output

    # --- decode ---------------------------------------------------------------------------------

    def decode(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               attention_mask: torch.Tensor | None, cache: CompressedCache, kwargs: dict[str, Any]) -> Any:
        adapter = self.adapter
        state = cache.tokenpress_state
        assert state is not None
        if input_ids is not None and bool(torch.isin(input_ids, torch.tensor(adapter.placeholder_ids(),
                                                                               device=input_ids.device)).any()):
            raise CompressionError("a follow-up turn on a compressed cache cannot contain image placeholders")
        hidden = inputs_embeds if inputs_embeds is not None else adapter.embed(input_ids)
        batch, count = hidden.shape[:2]
        if attention_mask is not None:
            new_valid = attention_mask[:, -count:].bool()
            new_padded = not bool(new_valid.all())  # the step's own input, read once for every layer
        else:
            new_valid = torch.ones(batch, count, dtype=torch.bool, device=hidden.device)
            new_padded = False
        offsets = torch.cumsum(new_valid.long(), dim=-1) - 1
        for layer in range(adapter.num_layers):
            positions = (state.next_position[layer].unsqueeze(1) + offsets.clamp_min(0))
            positions = positions.unsqueeze(0).expand(adapter.position_rank, -1, -1)
            key_valid = torch.cat([state.key_valid[layer], new_valid], dim=1)
            padded = None if state.padded is None else state.padded[layer] or new_padded
            key_positions = None
            if state.key_positions is not None:
                key_positions = torch.cat([state.key_positions[layer], positions], dim=2)
                state.key_positions[layer] = key_positions
            mask = adapter.decode_mask(layer, key_valid, key_positions, positions, hidden.dtype, padded)
            if state.padded is not None:
                state.padded[layer] = padded
            embeddings = adapter.position_embeddings(hidden, positions, layer)
            hidden = adapter.call_layer(layer, hidden, mask, positions, embeddings, cache)
            state.key_valid[layer] = key_valid
            state.next_position[layer] = state.next_position[layer] + new_valid.sum(-1)
        state.logical_length += count
        return adapter.make_output(adapter.final_norm(hidden), cache, None, state.position_offset)
