"""tokenpress's pre-LLM pipeline inside a vLLM model: the same adapters, stages and method code as the
Hugging Face path, on the checkpoint's own vision encoder and projector.

The vision side (encoder, projector, LLaVA-NeXT's image newline) is the transformers model's, loaded
with the same ``from_pretrained`` as tokenpress's Hugging Face path: tokenpress's adapter then encodes
the images (with any encoder signals or stages inside the encoder), the ``post_encoder`` and
``projector`` stages run exactly as in :class:`tokenpress.runtime.prefill.Prefill`, and the adapter lays out
each image's tokens (LLaVA-NeXT's newlines included) in the order the LLM reads them. vLLM's language
model then takes those embeddings in place of the image's placeholders.
"""

from __future__ import annotations

from dataclasses import replace as dc_replace
from typing import Any

import torch
from torch import nn

from tokenpress.core.errors import CompressionError
from tokenpress.core.registry import get_registry
from tokenpress.core.signals import as_requests, keyed
from tokenpress.core.tokens import TokenState
from tokenpress.runtime.adapter import ImageSpan, ModelAdapter
from tokenpress.runtime.attach import find_adapter, prepare_stages
from tokenpress.runtime.context import StageContext
from tokenpress.runtime.loading import load_model
from tokenpress.runtime.prefill import InsideEncoderStages, StageEntry, observed_runner, run_token_stage
from tokenpress_vllm.stacks import ServedStack, ServingStacks


def _drop_language_model(model: nn.Module, adapter: ModelAdapter) -> None:
    """Free the transformers copy's decoder layers (vLLM runs its own): they move to the meta device, so the
    module tree (depth, signatures) stays what tokenpress checks, and the input embeddings stay (a weights
    file is checked against them)."""
    for layer in adapter.layers:
        layer.to("meta")


class PreLLM:
    """The served stacks' pre-LLM stages on a transformers copy of the model's vision side."""

    def __init__(self, model_path: str, stacks: ServingStacks, dtype: torch.dtype, device: torch.device) -> None:
        model = load_model(model_path)
        self.adapter = find_adapter(model)
        _drop_language_model(model, self.adapter)
        # what is left (vision side, embeddings) to vLLM's device and dtype; the dropped layers stay on meta
        self.model = model._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(
            device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype))
        self.run_stage = observed_runner(get_registry())
        self.stacks = stacks
        self.entries: dict[int, list[StageEntry]] = {}
        adapter = self.adapter
        for served in stacks:
            stack = served.stack.resolved(adapter.num_layers, adapter.feature_blocks(),
                                           adapter.num_encoder_layers() or None)
            self.entries[served.index] = prepare_stages(stack, adapter) if stack.stages else []

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    @torch.inference_mode()
    def embed(self, served: ServedStack, media: dict[str, Any], num_images: int) -> list[torch.Tensor]:
        """Each image's visual tokens in LLM space, in the order the LLM reads them (what its placeholders
        hold), for ``num_images`` images given as the model's processor makes them (``media``)."""
        adapter = self.adapter
        entries = self.entries[served.index]
        media = {key: value.to(self.dtype) if torch.is_floating_point(value) else value
                 for key, value in media.items()}
        states: dict[str, dict[str, Any]] = {}
        requests = list(dict.fromkeys(request for entry in entries
                                      for request in as_requests(entry.method.required_signals())))
        inside = InsideEncoderStages(adapter, [entry for entry in entries if entry.stage.inside_encoder],
                                     self.run_stage, states, [0] * num_images)
        if inside.entries:
            tokens, computed = adapter.encode_images(media, requests, inside)
        else:
            tokens, computed = adapter.encode_images(media, requests)
        rows_per_image, leftover = divmod(tokens.num_images, num_images)
        if leftover:
            raise CompressionError(f"the encoder gave {tokens.num_images} token rows for {num_images} images")
        # Every image is its own sample here: vLLM encodes (and caches) each image apart from its prompt.
        row_image = [row // rows_per_image for row in range(tokens.num_images)]
        row_part = [row % rows_per_image for row in range(tokens.num_images)]
        tokens = dc_replace(tokens, image_to_sample=torch.tensor(row_image, device=tokens.embeddings.device))

        def project(state: TokenState) -> TokenState:
            """The model's projector, applied once (tokens already in LLM space pass through)."""
            return state if state.space == "llm" else adapter.project(state)

        context = StageContext(stage=None, signals=keyed(computed), project=project,  # type: ignore[arg-type]
                               sample_keys=[0] * num_images, image_rank=row_part, image_samples=row_image,
                               adapter=adapter)
        for point in ("post_encoder", "projector"):
            for entry in entries:
                if entry.stage.point == point and not entry.stage.inside_encoder:
                    tokens = run_token_stage(entry, point, tokens, context, states, self.run_stage)
        tokens = project(tokens)
        return self._per_image(tokens, served, rows_per_image, num_images)

    def _per_image(self, tokens: TokenState, served: ServedStack, rows_per_image: int,
                   num_images: int) -> list[torch.Tensor]:
        """Each image's tokens as the adapter lays them into the sequence (its rows in order, LLaVA-NeXT's
        image newlines between grid rows)."""
        adapter = self.adapter
        width = tokens.embeddings.shape[-1]
        bank = tokens.embeddings.reshape(-1, width)
        extra = adapter.extra_embeddings()
        if extra is not None:
            bank = torch.cat([bank, extra.to(bank.dtype)])
        visual = tokens.num_images * tokens.num_slots
        images = []
        for image in range(num_images):
            rows = tuple(range(image * rows_per_image, (image + 1) * rows_per_image))
            span = ImageSpan(sample=image, start=0, length=bank.shape[0] + 1, image=image, rows=rows)
            layout = adapter.layout_image(span, tokens, 0, served.compact)
            index = torch.tensor([source if source >= 0 else visual - 1 - source for source in layout.sources],
                                 dtype=torch.long, device=bank.device)
            images.append(bank.index_select(0, index))
        return images
