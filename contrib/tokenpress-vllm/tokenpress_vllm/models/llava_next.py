"""LLaVA-NeXT served with tokenpress stacks: vLLM's LLaVA-NeXT, its images (base tile and stitched,
unpadded high-resolution grid, with image newlines) through tokenpress's pre-LLM stages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from tokenpress_vllm.models.common import StackInfoMixin, StackModelMixin, StackProcessorMixin


class TokenpressLlavaNextProcessingInfo(StackInfoMixin, LlavaNextProcessingInfo):
    pass


class TokenpressLlavaNextMultiModalProcessor(StackProcessorMixin, LlavaNextMultiModalProcessor):
    def _images_in(self, processed: Mapping[str, Any]) -> int:
        return len(processed["image_sizes"])

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        image_token_id = self.info.get_hf_config().image_token_index
        stacks = self.info.tokenpress_stacks

        def replacement(item_idx: int) -> list[int]:
            served = self._served_stack(out_mm_kwargs, item_idx)
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [image_token_id] * stacks.layout(served, (size.height, size.width)).count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(TokenpressLlavaNextMultiModalProcessor,
                                        info=TokenpressLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokenpressLlavaNextForConditionalGeneration(StackModelMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose image embeddings come from tokenpress's pre-LLM stages."""

    replaced_modules = ("vision_tower", "multi_modal_projector", "image_newline")

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._replace_vision(vllm_config)

    def _images_in(self, kwargs: Mapping[str, Any]) -> int:
        return len(kwargs["image_sizes"])

    def _media(self, kwargs: Mapping[str, Any], images: list[int]) -> dict[str, Any]:
        """The chosen images' tiles, (images, tiles, 3, H, W) padded to the most tiles: tokenpress's adapter
        takes each image's own tile count from its size."""
        tiles = [kwargs["pixel_values"][image] for image in images]
        most = max(tile.shape[0] for tile in tiles)
        padded = [torch.cat([tile, tile.new_zeros(most - tile.shape[0], *tile.shape[1:])]) for tile in tiles]
        sizes = torch.as_tensor(kwargs["image_sizes"]).reshape(-1, 2)[images]
        return {"pixel_values": torch.stack(padded), "image_sizes": sizes}

    def _image_size(self, kwargs: Mapping[str, Any], image: int) -> tuple[int, int] | None:
        height, width = torch.as_tensor(kwargs["image_sizes"]).reshape(-1, 2)[image].tolist()
        return int(height), int(width)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        if kwargs.get("pixel_values") is None:
            return []
        return self._compressed_embeddings(kwargs)
