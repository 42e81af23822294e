"""Requests per second of vLLM serving the LLaVA proxy uncompressed and with `pool` (kernel 2), in one run.

One engine serves both stacks (each request chooses one), so both are measured on the same engine, in
alternating rounds; vLLM's prefix cache and multimodal processor cache are off, so every round encodes
and prefills every request again. Not a test: run it and read the numbers.

    python benchmarks/throughput.py [--model zoo:llava-shapes] [--requests 64] [--rounds 3] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:llava-shapes")
    parser.add_argument("--requests", type=int, default=64, help="prompts in the batch (one image each)")
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per stack (the median is reported)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request (greedy)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    import tokenpress_vllm
    from tokenpress.data import shapes

    stacks = {"uncompressed": {"name": "uncompressed", "stages": []},
              "pool": {"name": "pool", "stages": [{"method": "pool", "params": {"kernel": 2}}]}}
    llm = LLM(**tokenpress_vllm.engine_args(args.model, stacks), enforce_eager=True, max_model_len=512,
              dtype="float32", seed=0, enable_prefix_caching=False, mm_processor_cache_gb=0)
    image_token = "<|image_pad|>" if "qwen" in args.model else "<image>"
    samples = [shapes.make_sample("test", index) for index in range(args.requests)]
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def batch(stack: str) -> list[dict]:
        return [{"prompt": shapes.build_prompt(sample.question, image_token),
                 "multi_modal_data": {"image": sample.image}, "mm_processor_kwargs": {"tokenpress_stack": stack}}
                for sample in samples]

    seconds: dict[str, list[float]] = {name: [] for name in stacks}
    prompt_tokens: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for name in stacks:  # warm-up round, not timed
        llm.generate(batch(name), sampling, use_tqdm=False)
    for _ in range(args.rounds):
        for name in stacks:
            requests = batch(name)
            start = time.perf_counter()
            outputs = llm.generate(requests, sampling, use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
            prompt_tokens[name] = statistics.mean(len(output.prompt_token_ids) for output in outputs)
            scored = shapes.score([output.outputs[0].text for output in outputs], samples)
            accuracy[name] = scored["accuracy"]
    rates = {name: args.requests / statistics.median(times) for name, times in seconds.items()}
    print(f"model {args.model}, {args.requests} requests a batch, {args.max_tokens} tokens each, "
          f"median of {args.rounds} rounds")
    print(f"{'stack':<14} {'requests/s':>11} {'prompt tokens':>14} {'accuracy':>9}")
    for name in stacks:
        print(f"{name:<14} {rates[name]:>11.1f} {prompt_tokens[name]:>14.1f} {accuracy[name]:>9.3f}")
    print(f"pool / uncompressed: {rates['pool'] / rates['uncompressed']:.2f}x the requests per second")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
