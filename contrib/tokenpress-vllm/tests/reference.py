"""Greedy answers of the same prompts through tokenpress's Hugging Face path and through vLLM, in one form
(the generated token ids up to the end of sequence, and the prompt's length as the LLM saw it), so that
tests compare them with ``==``."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

import tokenpress
from tokenpress.data import shapes
from tokenpress.runtime.loading import load_model_and_processor, process

#: Set before any engine starts: vLLM's CPU backend takes its KV cache size (GiB) from here.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
#: What every test engine is built with (the proxies are float32 checkpoints; no compilation on 2 cores).
ENGINE_OPTIONS = {"enforce_eager": True, "max_model_len": 512, "dtype": "float32", "seed": 0}
MAX_NEW_TOKENS = 4


@dataclass(frozen=True)
class Answer:
    tokens: tuple[int, ...]  # generated ids, up to (not including) the end of sequence
    prompt_tokens: int  # the prompt's length as the LLM saw it (compressed visual tokens included)


def shapes_questions(count: int, image_token: str, start: int = 0) -> tuple[list[str], list[Any], list[str]]:
    """Prompts, images and answers of ``count`` test questions of the shapes benchmark."""
    samples = [shapes.make_sample("test", index) for index in range(start, start + count)]
    return [shapes.build_prompt(sample.question, image_token) for sample in samples], \
        [sample.image for sample in samples], [sample.answer for sample in samples]


@functools.lru_cache(maxsize=4)
def _hf(model: str) -> tuple[Any, Any]:
    return load_model_and_processor(model)


def _until_eos(tokens: list[int], eos: set[int]) -> tuple[int, ...]:
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(int(token))
    return tuple(out)


def eos_ids(model: str) -> set[int]:
    eos = _hf(model)[0].generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


def hf_answers(model: str, stack: dict | None, prompts: list[str], images: list[Any],
               max_new_tokens: int = MAX_NEW_TOKENS) -> list[Answer]:
    """Greedy answers of tokenpress's Hugging Face path (the stack attached to the transformers model)."""
    model_obj, processor = _hf(model)
    inputs = process(processor, images, prompts, padding=True)
    handle = tokenpress.compress(model_obj, stack) if stack and stack["stages"] else None
    try:
        with torch.no_grad():
            output = model_obj.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        lengths = handle.prefill_stats.layer_tokens[0] if handle else inputs["attention_mask"].sum(-1).tolist()
    finally:
        if handle is not None:
            handle.detach()
    new = output[:, inputs["input_ids"].shape[1]:].tolist()
    eos = eos_ids(model)
    return [Answer(_until_eos(row, eos), int(length)) for row, length in zip(new, lengths, strict=True)]


def vllm_answers(llm: Any, model: str, prompts: list[str], images: list[Any], stack: str | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> list[Answer]:
    """Greedy answers of a vLLM engine; ``stack`` names the server's stack the requests choose (None: its
    default)."""
    from vllm import SamplingParams

    requests = []
    for prompt, image in zip(prompts, images, strict=True):
        request: dict[str, Any] = {"prompt": prompt, "multi_modal_data": {"image": image}}
        if stack is not None:
            request["mm_processor_kwargs"] = {"tokenpress_stack": stack}
        requests.append(request)
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    eos = eos_ids(model)
    return [Answer(_until_eos(list(out.outputs[0].token_ids), eos), len(out.prompt_token_ids)) for out in outputs]


def start_engine(model: str, stacks: dict[str, dict], **options: Any) -> Any:
    """A vLLM engine serving ``model`` with ``stacks`` (the first is the default)."""
    os.environ.update(CPU_ENV)
    from vllm import LLM

    import tokenpress_vllm

    return LLM(**tokenpress_vllm.engine_args(model, stacks), **{**ENGINE_OPTIONS, **options})


def stop_engine(llm: Any) -> None:
    """Shut the engine's processes down now (the next engine of the session gets the cores)."""
    llm.llm_engine.engine_core.shutdown()


def stack(name: str, *stages: dict, positions: str = "original") -> dict:
    return {"name": name, "positions": positions, "stages": list(stages)}


NONE = stack("none")
POOL = stack("pool", {"method": "pool", "params": {"kernel": 2}})


def save_tiny_llava_next(folder: Any) -> str:
    """A random-weight LLaVA-NeXT checkpoint with its processor, built from a config as
    ``tokenpress.testing.models`` builds its tiny models (32-pixel tiles of 4x4 patches, pinpoints 32x64,
    64x32, 64x64), with a decoder vLLM's CPU attention takes (head size 32)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from tokenpress.testing.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, word_tokenizer

    torch.manual_seed(0)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
                       pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = 2
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=word_tokenizer(), patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   image_token="<image>")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
