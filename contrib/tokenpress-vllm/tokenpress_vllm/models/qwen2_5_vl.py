"""Qwen2.5-VL served with tokenpress stacks: vLLM's Qwen2.5-VL, its images through tokenpress's pre-LLM
stages, and the M-RoPE positions of each image's kept tokens laid out by tokenpress's adapter (as the
Hugging Face path lays them out), not vLLM's positions of the uncompressed grid. Images only: videos are
not offered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from tokenpress.core.tokens import TokenState
from tokenpress_vllm.models.common import StackInfoMixin, StackModelMixin, StackProcessorMixin
from tokenpress_vllm.stacks import REQUEST_KEY, ImageLayout, ServedStack


class TokenpressQwen2_5_VLProcessingInfo(StackInfoMixin, Qwen2_5_VLProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def pixel_size(self, grid_thw: Sequence[int]) -> tuple[int, int]:
        """The image's size after the processor's resize, from its patch grid (what tokenpress's count takes)."""
        patch = self.get_hf_config().vision_config.patch_size
        _, height, width = (int(value) for value in grid_thw)
        return height * patch, width * patch


class TokenpressQwen2_5_VLMultiModalProcessor(StackProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    def _images_in(self, processed: Mapping[str, Any]) -> int:
        grids = processed.get("image_grid_thw")
        return 0 if grids is None else len(grids)

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        image_token_id = self.info.get_hf_config().image_token_id
        stacks = self.info.tokenpress_stacks

        def replacement(item_idx: int) -> list[int]:
            served = self._served_stack(out_mm_kwargs, item_idx)
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return [image_token_id] * stacks.layout(served, self.info.pixel_size(grid)).count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(TokenpressQwen2_5_VLMultiModalProcessor,
                                        info=TokenpressQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokenpressQwen2_5_VLForConditionalGeneration(StackModelMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose image embeddings and their M-RoPE positions come from tokenpress."""

    replaced_modules = ("visual",)
    # tokenpress's encoder takes the processor's normalised pixels
    supports_mm_device_do_normalize = False

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._replace_vision(vllm_config)

    def _grids(self, kwargs: Mapping[str, Any]) -> torch.Tensor:
        return torch.as_tensor(kwargs["image_grid_thw"]).reshape(-1, 3).long()

    def _images_in(self, kwargs: Mapping[str, Any]) -> int:
        return len(self._grids(kwargs))

    def _media(self, kwargs: Mapping[str, Any], images: list[int]) -> dict[str, Any]:
        grids = self._grids(kwargs)
        pixel_values = kwargs["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.cat(list(pixel_values))
        per_image = torch.split(pixel_values, grids.prod(-1).tolist())
        return {"pixel_values": torch.cat([per_image[image] for image in images]), "image_grid_thw": grids[images]}

    def _image_size(self, kwargs: Mapping[str, Any], image: int) -> tuple[int, int] | None:
        patch = self.config.vision_config.patch_size
        _, height, width = self._grids(kwargs)[image].tolist()
        return height * patch, width * patch

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("tokenpress serves Qwen2.5-VL with images only; this request has a video")
        if kwargs.get("pixel_values") is None:
            return []
        return self._compressed_embeddings(kwargs)

    def _image_positions(self, served: ServedStack, layout: ImageLayout, start: int) -> tuple[list[list[int]], int]:
        """(3, count) M-RoPE positions of an image's kept tokens from ``start``, and the next free position, as
        tokenpress's adapter lays them out (they depend on the kept tokens' layout only, known before encoding)."""
        count = layout.count
        if layout.kind == "summary":
            tokens = TokenState.from_dense(torch.zeros(1, 1, 1), [(1, 1, 1)]).summarize(torch.zeros(1, count, 1))
        else:
            grid = layout.grids[0] if layout.kind == "grid" else (1, 1, count)
            tokens = TokenState.from_dense(torch.zeros(1, count, 1), [grid])
        assert self.pre_llm is not None
        return self.pre_llm.adapter.image_positions(start, tokens, 0, torch.arange(count), served.compact)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        rows: list[list[int]] = [[], [], []]
        position = column = 0

        def text_until(end: int) -> None:
            nonlocal position, column
            for row in rows:
                row.extend(range(position, position + end - column))
            position, column = position + end - column, end

        patch = self.config.vision_config.patch_size
        for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
            if feature.modality != "image":
                raise ValueError("tokenpress serves Qwen2.5-VL with images only; this request has a video")
            text_until(feature.mm_position.offset)
            served = self.tokenpress_stacks[int(feature.data[REQUEST_KEY].data)]
            _, height, width = feature.data["image_grid_thw"].data.tolist()
            layout = self.tokenpress_stacks.layout(served, (height * patch, width * patch))
            positions, position = self._image_positions(served, layout, position)
            for row, values in zip(rows, positions, strict=True):
                row.extend(values)
            column += layout.count
        text_until(len(input_tokens))
        return torch.tensor(rows, dtype=torch.long), position - len(input_tokens)
