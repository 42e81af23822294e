"""vLLM's tensor parallelism over 2 CPU ranks with a tokenpress stack: the same answers as tokenpress's Hugging
Face path (every rank runs the same pre-LLM stages on the whole batch; vLLM splits the language model)."""

from __future__ import annotations

import os

import pytest
from reference import NONE, POOL, hf_answers, shapes_questions, start_engine, stop_engine, vllm_answers

MODEL = "zoo:llava-shapes"
PROMPTS, IMAGES, TRUTH = shapes_questions(8, "<image>", start=8)


@pytest.fixture(scope="module")
def llm():
    # one OpenMP thread per rank, each on its own core
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        engine = start_engine(MODEL, {"pool": POOL, "none": NONE}, tensor_parallel_size=2)
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    yield engine
    stop_engine(engine)


def test_pool_on_two_ranks_equals_the_hugging_face_path(llm):
    assert vllm_answers(llm, MODEL, PROMPTS, IMAGES) == hf_answers(MODEL, POOL, PROMPTS, IMAGES)


def test_uncompressed_on_two_ranks_equals_the_hugging_face_path(llm):
    assert vllm_answers(llm, MODEL, PROMPTS, IMAGES, "none") == hf_answers(MODEL, None, PROMPTS, IMAGES)
