"""The vLLM general plugin (entry point group ``vllm.general_plugins``): registers tokenpress's model
classes with vLLM's model registry, by name, so nothing of vLLM's model code is imported before it is used."""

from __future__ import annotations

#: vLLM architecture name -> "module:class" of the tokenpress class serving it.
MODEL_CLASSES = {
    "TokenpressLlavaForConditionalGeneration":
        "tokenpress_vllm.models.llava:TokenpressLlavaForConditionalGeneration",
    "TokenpressLlavaNextForConditionalGeneration":
        "tokenpress_vllm.models.llava_next:TokenpressLlavaNextForConditionalGeneration",
    "TokenpressQwen2_5_VLForConditionalGeneration":
        "tokenpress_vllm.models.qwen2_5_vl:TokenpressQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Called by vLLM in every process it starts (front end, engine core, workers)."""
    from vllm import ModelRegistry

    for architecture, location in MODEL_CLASSES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, location)
