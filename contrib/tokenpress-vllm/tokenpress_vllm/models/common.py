"""What the tokenpress model classes of every family share: the stack a request chose travels with each
image through vLLM's processor (an extra per-image field, so vLLM's multimodal caches key on it), the
placeholder count comes from the stack, and the model's vision side is tokenpress's pre-LLM pipeline.

These build on vLLM's own model, processor and processing-info classes and override a few of their
methods, some of them private: the distribution pins the vLLM release they were written against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any, ClassVar

import torch
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal.inputs import MultiModalFieldConfig

from tokenpress.core.errors import CompressionError
from tokenpress_vllm.pre_llm import PreLLM
from tokenpress_vllm.stacks import REQUEST_KEY, ServedStack, ServingStacks


class StackInfoMixin:
    """For a family's ``ProcessingInfo``: the server's stacks, and a processor that never sees the
    request's stack choice (it is tokenpress's, not the Hugging Face processor's)."""

    @cached_property
    def tokenpress_stacks(self) -> ServingStacks:
        return ServingStacks.from_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> Any:
        kwargs.pop(REQUEST_KEY, None)
        return super().get_hf_processor(**kwargs)


class StackProcessorMixin:
    """For a family's multimodal processor: each image carries the index of the stack its request chose."""

    def _images_in(self, processed: Mapping[str, Any]) -> int:
        """How many images the Hugging Face processor's output holds."""
        raise NotImplementedError

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        served = self.info.tokenpress_stacks.choose(hf_kwargs.get(REQUEST_KEY))
        kwargs = {key: value for key, value in hf_kwargs.items() if key != REQUEST_KEY}
        processed = super()._call_hf_processor(hf_data, kwargs)
        processed[REQUEST_KEY] = torch.full((self._images_in(processed),), served.index, dtype=torch.long)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> dict[str, Any]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[REQUEST_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _served_stack(self, out_mm_kwargs: Any, item_idx: int) -> ServedStack:
        """The stack image ``item_idx`` of a request is served with."""
        return self.info.tokenpress_stacks[int(out_mm_kwargs["image"][item_idx][REQUEST_KEY].data)]


class StackModelMixin:
    """For a family's vLLM model class: vLLM's own vision modules are dropped and tokenpress's pre-LLM
    pipeline (the transformers modules, loaded from the same checkpoint) makes the image embeddings."""

    #: The vLLM submodules (and parameters) that tokenpress's pre-LLM pipeline replaces.
    replaced_modules: ClassVar[tuple[str, ...]] = ()

    def _replace_vision(self, vllm_config: Any) -> None:
        """Called at the end of ``__init__``: validate the served stacks and drop vLLM's vision modules."""
        self.tokenpress_stacks = ServingStacks.from_config(self.config)
        checkpoint = self.tokenpress_stacks.checkpoint or vllm_config.model_config.model
        self.tokenpress_source = (checkpoint, vllm_config.model_config.dtype)
        self.pre_llm: PreLLM | None = None
        for name in self.replaced_modules:
            delattr(self, name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM loads the language model; transformers loads the vision side for tokenpress's pipeline."""
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=list(self.replaced_modules))
        loaded = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
        path, dtype = self.tokenpress_source
        device = next(self.parameters()).device
        self.pre_llm = PreLLM(path, self.tokenpress_stacks, dtype, device)
        return loaded

    def _images_in(self, kwargs: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def _media(self, kwargs: Mapping[str, Any], images: list[int]) -> dict[str, Any]:
        """The model inputs of the chosen images, as tokenpress's adapter takes them."""
        raise NotImplementedError

    def _image_size(self, kwargs: Mapping[str, Any], image: int) -> tuple[int, int] | None:
        """The image size the family's token count depends on (see :func:`tokenpress.core.flops.simulate`)."""
        return None

    def _compressed_embeddings(self, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Every image's LLM embeddings, each image through the stack its request chose, in input order."""
        count = self._images_in(kwargs)
        choices = kwargs.get(REQUEST_KEY)
        if choices is None:
            choices = [self.tokenpress_stacks.by_name[self.tokenpress_stacks.default].index] * count
        indices = [int(choice) for choice in (choices.tolist() if isinstance(choices, torch.Tensor) else choices)]
        out: list[torch.Tensor | None] = [None] * count
        assert self.pre_llm is not None, "tokenpress's pre-LLM pipeline is built when the weights are loaded"
        for stack_index in dict.fromkeys(indices):
            images = [image for image, chosen in enumerate(indices) if chosen == stack_index]
            served = self.tokenpress_stacks[stack_index]
            embedded = self.pre_llm.embed(served, self._media(kwargs, images), len(images))
            for image, tokens in zip(images, embedded, strict=True):
                promised = self.tokenpress_stacks.layout(served, self._image_size(kwargs, image)).count
                if tokens.shape[0] != promised:
                    raise CompressionError(f"stack {served.name!r} left {tokens.shape[0]} tokens of an image whose "
                                           f"placeholders were sized for {promised}: a stage broke its promise")
                out[image] = tokens.to(self.tokenpress_source[1])
        return out  # type: ignore[return-value]
