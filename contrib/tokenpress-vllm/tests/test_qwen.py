"""Qwen2.5-VL (the zoo's qwen2.5-vl-shapes proxy) under vLLM with tokenpress stacks equals tokenpress's Hugging
Face path: the answers and prompt lengths, with M-RoPE positions that follow the kept tokens (the pooled grid
under `positions: original`, one after another under `compact` and for a Q-Former's summary tokens)."""

from __future__ import annotations

import pytest
from reference import NONE, POOL, hf_answers, shapes_questions, stack, start_engine, stop_engine, vllm_answers

MODEL = "zoo:qwen2.5-vl-shapes"
STACKS = {
    "pool": POOL,
    "none": NONE,
    "pool_compact": stack("pool_compact", {"method": "pool", "params": {"kernel": 2}}, positions="compact"),
    "pixel_unshuffle": stack("pixel_unshuffle", {"method": "pixel_unshuffle",
                                                 "params": {"ratio": 2, "weights": "zoo"}}),
    "ldp": stack("ldp", {"method": "ldp", "params": {"stride": 2, "weights": "zoo"}}),
    "qformer": stack("qformer", {"method": "qformer", "params": {"queries": 8}}),
}
PROMPTS, IMAGES, TRUTH = shapes_questions(8, "<|image_pad|>")


@pytest.fixture(scope="module")
def llm():
    engine = start_engine(MODEL, STACKS)
    yield engine
    stop_engine(engine)


@pytest.mark.parametrize("name", list(STACKS))
def test_each_stack_equals_the_hugging_face_path(llm, name):
    assert vllm_answers(llm, MODEL, PROMPTS, IMAGES, name) == hf_answers(MODEL, STACKS[name], PROMPTS, IMAGES)


def test_pool_keeps_a_quarter_of_the_tokens(llm):
    pooled = vllm_answers(llm, MODEL, PROMPTS, IMAGES, "pool")
    uncompressed = vllm_answers(llm, MODEL, PROMPTS, IMAGES, "none")
    # the 6x6 grid of merged 2x2 patch units becomes 3x3
    assert [answer.prompt_tokens for answer in pooled] == [answer.prompt_tokens - 27 for answer in uncompressed]
