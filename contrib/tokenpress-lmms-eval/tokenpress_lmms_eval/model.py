"""The ``tokenpress`` lmms-eval model: a Hugging Face vision-language model answering with a stack attached.

    python -m lmms_eval --model tokenpress \\
        --model_args pretrained=zoo:llava-shapes,stack=stacks/fastv.yaml --tasks TASK --batch_size 50

Everything that touches the model is tokenpress's own, as ``tokenpress eval`` uses it: the model and processor
come from :func:`tokenpress.runtime.loading.load_model_and_processor`, each batch goes through
:func:`tokenpress.runtime.loading.process` with the prompt of :func:`tokenpress.data.shapes.build_prompt`, the stack is
attached around the batch with :func:`tokenpress.compress` and detached after it, and answers are greedy
``generate`` outputs decoded with ``skip_special_tokens``. So on the same questions lmms-eval's accuracy is
``tokenpress eval``'s.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm.auto import tqdm

from tokenpress.core.errors import InputError
from tokenpress.core.stack import Stack, load_stack
from tokenpress.data import shapes
from tokenpress.runtime.attach import compress
from tokenpress.runtime.loading import chat_prompt, load_model_and_processor, process

PROMPT_STYLES = ("plain", "chat")


def _positive_int(name: str, value: Any) -> int:
    """``value`` as a positive integer (lmms-eval hands numbers over as ints or strings), or one sentence why not."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise InputError(f"{name}={value!r}: expected a positive integer")
    return number


class TokenpressModel(lmms):
    """A checkpoint (``pretrained=zoo:NAME|PATH``) answering lmms-eval's generation requests, compressed by
    ``stack=PATH`` (no stack: the uncompressed model).

    Model arguments: ``pretrained`` (default ``zoo:llava-shapes``), ``stack``, ``batch_size`` (or lmms-eval's
    ``--batch_size``), ``max_new_tokens`` (for tasks whose ``generation_kwargs`` set none), ``device``
    (or ``--device``; default ``cpu``) and ``prompt``: ``plain`` (``tokenpress eval``'s ``IMAGE_TOKEN\\nTEXT``)
    or ``chat`` (the checkpoint's chat template, for checkpoints trained on one).
    """

    is_simple = True

    def __init__(self, pretrained: str = "zoo:llava-shapes", stack: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | str = 128, device: str | None = None, prompt: str = "plain",
                 max_batch_size: int | None = None) -> None:
        # max_batch_size: lmms-eval passes it with --batch_size; batches here are always batch_size documents.
        super().__init__()
        if prompt not in PROMPT_STYLES:
            raise InputError(f"prompt={prompt!r}: expected one of {', '.join(PROMPT_STYLES)}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.prompt_style = prompt
        self.device = torch.device(device or "cpu")
        self.stack: Stack | None = load_stack(Path(stack)) if str(stack or "none").lower() != "none" else None
        self.model, self.processor = load_model_and_processor(str(pretrained))
        self.model = self.model.to(self.device)
        if self.stack is not None:
            compress(self.model, self.stack).detach()  # a stack that does not fit this model fails here, not mid-run
        self.image_token: str = getattr(self.processor, "image_token", shapes.IMAGE_TOKEN)
        self._warned_sampling = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokenpressModel:
        """lmms-eval's constructor from ``--model_args`` and its own options (``--batch_size``, ``--device``):
        a value given in ``--model_args`` wins over the option's (lmms-eval always passes ``--batch_size``, even
        its default, so passing both would otherwise be a duplicate argument)."""
        from lmms_eval.utils import simple_parse_args_string

        arguments = simple_parse_args_string(arg_string)
        options = {key: value for key, value in (additional_config or {}).items() if value is not None}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise InputError(f"unknown tokenpress model argument(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(sorted(known - {'max_batch_size'}))}")
        return cls(**{**options, **arguments})

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers to ``requests`` in their order, ``batch_size`` documents at a time (requests with the
        same generation arguments share batches), each cut at the first of the task's ``until`` strings."""
        answers: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1] or {}, sort_keys=True, default=str), []).append(position)
        bar = tqdm(total=len(requests), desc="tokenpress", unit="request", disable=self.rank != 0)
        for positions in groups.values():
            generation = dict(requests[positions[0]].args[1] or {})
            for start in range(0, len(positions), self.batch_size):
                batch = positions[start:start + self.batch_size]
                for position, answer in zip(batch, self._answer([requests[p] for p in batch], generation), strict=True):
                    answers[position] = answer
                bar.update(len(batch))
        bar.close()
        return answers

    def _answer(self, batch: list[Instance], generation: dict[str, Any]) -> list[str]:
        """One batch: prompts and images processed together (padded on the left), the stack attached around
        ``generate`` exactly as ``tokenpress eval`` does, outputs decoded and cut at ``until``."""
        images: list[Image.Image] = []
        prompts: list[str] = []
        for request in batch:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if not visuals or not all(isinstance(visual, Image.Image) for visual in visuals):
                raise InputError(f"task {task}, document {doc_id}: the tokenpress model answers about images, "
                                 "and this document gives none (or a video)")
            images += [visual.convert("RGB") for visual in visuals]
            prompts.append(self._prompt(context, len(visuals), f"task {task}, document {doc_id}"))
        first, last = batch[0].args, batch[-1].args
        inputs = process(self.processor, images, prompts, padding=True,
                         what=f"task {first[4]}, documents {first[3]}-{last[3]}")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        max_new_tokens = _positive_int("max_new_tokens", generation.get("max_new_tokens", self.max_new_tokens))
        if generation.get("do_sample") and not self._warned_sampling:
            logger.warning("the tokenpress model decodes greedily; the task's sampling arguments are not used")
            self._warned_sampling = True
        with torch.no_grad():
            handle = compress(self.model, self.stack) if self.stack is not None and self.stack.stages else None
            try:
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            finally:
                if handle is not None:
                    handle.detach()
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        until = generation.get("until") or []
        return [_cut(text, [until] if isinstance(until, str) else until) for text in texts]

    def _prompt(self, context: str, images: int, what: str) -> str:
        """The text fed to the processor: the task's own when it already places the image token, else
        ``tokenpress eval``'s ``IMAGE_TOKEN\\nTEXT`` (``prompt=plain``) or the chat template (``prompt=chat``)."""
        if self.image_token in context:
            return context
        if self.prompt_style == "chat":
            if images != 1:
                raise InputError(f"{what}: prompt=chat formats one image per document, this one has {images}")
            return chat_prompt(self.processor, context)
        return shapes.build_prompt(context, self.image_token * images)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the tokenpress model only generates (generate_until); tasks that score "
                                  "log-likelihoods are not supported")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokenpress model answers single-round tasks only (generate_until)")


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string in ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
