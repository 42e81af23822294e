"""LLaVA-1.5 served with tokenpress stacks: vLLM's LLaVA, its images through tokenpress's pre-LLM stages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from tokenpress_vllm.models.common import StackInfoMixin, StackModelMixin, StackProcessorMixin


class TokenpressLlavaProcessingInfo(StackInfoMixin, LlavaProcessingInfo):
    pass


class TokenpressLlavaMultiModalProcessor(StackProcessorMixin, LlavaMultiModalProcessor):
    def _images_in(self, processed: Mapping[str, Any]) -> int:
        return len(processed["pixel_values"])

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        image_token_id = self.info.get_hf_config().image_token_index
        stacks = self.info.tokenpress_stacks

        def replacement(item_idx: int) -> list[int]:
            served = self._served_stack(out_mm_kwargs, item_idx)
            return [image_token_id] * stacks.layout(served, None).count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(TokenpressLlavaMultiModalProcessor, info=TokenpressLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokenpressLlavaForConditionalGeneration(StackModelMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose image embeddings come from tokenpress's pre-LLM stages."""

    replaced_modules = ("vision_tower", "multi_modal_projector")

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._replace_vision(vllm_config)

    def _images_in(self, kwargs: Mapping[str, Any]) -> int:
        return len(kwargs["pixel_values"])

    def _media(self, kwargs: Mapping[str, Any], images: list[int]) -> dict[str, Any]:
        pixel_values = kwargs["pixel_values"]
        return {"pixel_values": torch.stack([pixel_values[image] for image in images])}

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        if kwargs.get("pixel_values") is None:
            return []
        return self._compressed_embeddings(kwargs)
