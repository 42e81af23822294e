"""LLaVA-NeXT (no zoo proxy: a tiny random-weight checkpoint built from a config) under vLLM with tokenpress
stacks equals tokenpress's Hugging Face path with the same stacks, on images of several sizes (base tile,
stitched and unpadded crops, image newlines)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reference import NONE, POOL, hf_answers, save_tiny_llava_next, stack, start_engine, stop_engine, vllm_answers

STACKS = {
    "pool": POOL,
    "none": NONE,
    "qformer": stack("qformer", {"method": "qformer", "params": {"queries": 4}}),
    "pixel_unshuffle": stack("pixel_unshuffle", {"method": "pixel_unshuffle", "params": {"ratio": 2}}),
}
SIZES = [(40, 70), (64, 48), (32, 32), (70, 30)]  # (height, width): every pinpoint, with unpadding
PROMPTS = [f"w{5 + i} <image> w{9 + i} w{20 + i} w7" for i in range(len(SIZES))]


def _images() -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for height, width in SIZES]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="module")
def llm(model):
    engine = start_engine(model, STACKS)
    yield engine
    stop_engine(engine)


@pytest.mark.parametrize("name", list(STACKS))
def test_each_stack_equals_the_hugging_face_path(llm, model, name):
    images = _images()
    assert vllm_answers(llm, model, PROMPTS, images, name) == hf_answers(model, STACKS[name], PROMPTS, images)
