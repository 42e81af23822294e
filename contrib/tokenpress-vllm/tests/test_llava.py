"""LLaVA-1.5 (the zoo's llava-shapes proxy) under vLLM with tokenpress stacks equals tokenpress's Hugging Face
path with the same stacks: the greedy answers and the prompt lengths, for every pre-LLM method that promises
its count. One engine serves every stack; each request chooses its stack."""

from __future__ import annotations

import pytest
from reference import NONE, POOL, hf_answers, shapes_questions, stack, start_engine, stop_engine, vllm_answers

MODEL = "zoo:llava-shapes"
STACKS = {
    "pool": POOL,
    "none": NONE,
    "pixel_unshuffle": stack("pixel_unshuffle", {"method": "pixel_unshuffle",
                                                 "params": {"ratio": 2, "weights": "zoo"}}),
    "ldp": stack("ldp", {"method": "ldp", "params": {"stride": 2, "weights": "zoo"}}),
    "qformer": stack("qformer", {"method": "qformer", "params": {"queries": 16, "weights": "zoo"}}),
    "tome": stack("tome", {"method": "tome", "params": {"r": 16}}, positions="compact"),
    "visionzip": stack("visionzip", {"method": "visionzip", "params": {"dominant": 24, "contextual": 8}},
                       positions="compact"),
    "pool_then_random": stack("pool_then_random", {"method": "pool", "params": {"kernel": 2}},
                              {"method": "random", "at": "projector", "params": {"keep_ratio": 0.5, "seed": 1}},
                              positions="compact"),
}
PROMPTS, IMAGES, TRUTH = shapes_questions(8, "<image>")


@pytest.fixture(scope="module")
def llm():
    engine = start_engine(MODEL, STACKS)
    yield engine
    stop_engine(engine)


def test_pool_by_default_equals_the_hugging_face_path(llm):
    served = vllm_answers(llm, MODEL, PROMPTS, IMAGES)  # no choice: the server's default stack
    assert served == hf_answers(MODEL, POOL, PROMPTS, IMAGES)
    uncompressed = vllm_answers(llm, MODEL, PROMPTS, IMAGES, "none")
    # 2x2 pooling of the 12x12 patch grid: 36 visual tokens instead of 144
    assert [answer.prompt_tokens for answer in served] == [answer.prompt_tokens - 108 for answer in uncompressed]


@pytest.mark.parametrize("name", ["none", "pixel_unshuffle", "ldp", "qformer", "tome", "visionzip"])
def test_each_method_equals_the_hugging_face_path(llm, name):
    assert vllm_answers(llm, MODEL, PROMPTS, IMAGES, name) == hf_answers(MODEL, STACKS[name], PROMPTS, IMAGES)


def test_random_draws_are_reproducible_and_counted(llm):
    """random draws from its seed and the image's place in the prompt; vLLM encodes each image apart from its
    prompt, so its draw cannot follow the prompt as the Hugging Face path's does: only the count is compared."""
    first = vllm_answers(llm, MODEL, PROMPTS, IMAGES, "pool_then_random")
    again = vllm_answers(llm, MODEL, PROMPTS[::-1], IMAGES[::-1], "pool_then_random")[::-1]
    reference = hf_answers(MODEL, STACKS["pool_then_random"], PROMPTS, IMAGES)
    assert first == again
    assert [answer.prompt_tokens for answer in first] == [answer.prompt_tokens for answer in reference]


def test_an_unknown_stack_name_is_refused_in_one_sentence(llm):
    with pytest.raises(Exception, match="is not one of this server's stacks"):
        vllm_answers(llm, MODEL, PROMPTS[:1], IMAGES[:1], "fastv")
