"""``tokenpress fit``: train a stack's method weights by self-distillation against the same model
uncompressed. The model's own weights never change.

For every batch the uncompressed model (the stack suspended) answers each prompt greedily with
``answer_tokens`` tokens; then the compressed model reads the same prompt and answer
(teacher-forced), and the loss is the KL divergence from the teacher's next-token distributions to
the student's at the answer positions (the last prompt token and the answer tokens but the last).
Distilling the teacher's full distributions, not its answer alone, passes on how sure it was; and
answers need no labels, so a user's images with prompts are enough.

Resumable (``fit-state.pt`` in the output folder every ``save_every`` steps and at the end) and
reproducible from the seed on the CPU: the batches depend only on (seed, step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenpress.core import weights as weights_io
from tokenpress.core.errors import InputError
from tokenpress.core.stack import Stack, load_stack
from tokenpress.runtime.attach import compress
from tokenpress.tools.calibration import PromptedImage, batches

STATE_FILE = "fit-state.pt"
CARD_FILE = "FIT.md"
#: Steps between two saves of the fit's state (``--resume`` continues from the latest).
SAVE_EVERY = 50


@dataclass
class FitReport:
    """What ``fit`` did: per weighted stage the file written, and the run's numbers."""

    files: dict[str, Path]
    steps: int
    batch_size: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    held_out_loss_before: float = float("nan")
    held_out_loss_after: float = float("nan")
    agreement_before: float = float("nan")  # share of held-out answers where the student's greedy = the teacher's
    agreement_after: float = float("nan")


def _teacher(model: Any, inputs: dict[str, torch.Tensor], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncompressed model's greedy answer (B, k) and its logits at the positions that predict it
    (B, k, V): one ``generate`` call."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    answer = out.sequences[:, inputs["input_ids"].shape[1]:]
    return answer, torch.stack(out.logits, 1)[:, : answer.shape[1]].float()


def _with_answer(inputs: dict[str, torch.Tensor], answer: torch.Tensor) -> dict[str, torch.Tensor]:
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], answer], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], 1)
    return full


def _answer_logits(model: Any, full: dict[str, torch.Tensor], answer_length: int) -> torch.Tensor:
    """Logits at the positions that predict the answer tokens (prompts are left-padded), (B, k, V)."""
    logits = model(**full, use_cache=False).logits
    return logits[:, -answer_length - 1:-1].float()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="none").sum(-1).mean()


def fits(method_class: type) -> bool:
    """Whether ``tokenpress fit`` trains this method's weights: it has weights (a ``WeightedConfig``) and
    no learning procedure of its own (a ``calibrate``, as ALVTS's selector, whose top-k no gradient crosses)."""
    return "weights" in method_class.Config.model_fields and not method_class.can_calibrate()


def _weighted(handle: Any) -> list[Any]:
    return [entry for entry in handle.entries if entry.method.weights is not None and fits(type(entry.method))]


def fit(model: Any, processor: Any, stack: Stack | str | Path | dict, train: list[PromptedImage],
        held_out: list[PromptedImage], out_dir: str | Path, *, steps: int = 300, batch_size: int = 16,
        lr: float = 3e-4, seed: int = 0, chat: bool = False, answer_tokens: int = 2, resume: bool = False,
        save_every: int = SAVE_EVERY, progress: bool = True) -> FitReport:
    """Fit the weights of ``stack``'s stages on ``model``; write them (one file per weighted stage) and
    a card to ``out_dir``. ``train`` is cycled through in order, ``batch_size`` samples a step.
    ``resume``: continue from ``out_dir``'s saved state, refused when there is none (never a silent restart)."""

    if not lr > 0:
        raise InputError(f"--lr {lr}: the learning rate must be positive")
    parsed = load_stack(stack)
    out = Path(out_dir)
    if resume and not (out / STATE_FILE).is_file():
        raise InputError(f"{out}: no {STATE_FILE} to resume from")
    held_batches = list(batches(processor, held_out, batch_size, chat))
    frozen = [p for p in model.parameters() if p.requires_grad]
    start_time = time.perf_counter()
    for parameter in frozen:  # gradients reach the methods' weights only
        parameter.requires_grad_(False)
    try:
        with compress(model, parsed) as handle:
            stages = _weighted(handle)
            if not stages:
                raise InputError(f"{parsed.source}: no stage of this stack has weights to fit")
            parameters = [p for entry in stages for p in entry.method.weights.parameters()]
            for parameter in parameters:
                parameter.requires_grad_(True)
            optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
            start, losses = 0, []
            state_path = out / STATE_FILE
            if resume:
                state = torch.load(state_path, weights_only=False)
                for entry, module_state in zip(stages, state["modules"], strict=True):
                    entry.method.weights.load_state_dict(module_state)
                optimizer.load_state_dict(state["optimizer"])
                start, losses = int(state["step"]), list(state["losses"])
                start_time -= float(state.get("seconds", 0.0))  # the card's time covers every run
            before = _held_out(model, handle, held_batches, answer_tokens) if start == 0 else (
                state.get("before", (float("nan"), float("nan"))))
            bar = tqdm(total=steps, initial=start, desc="fit", unit="step", disable=not progress)
            for step in range(start, steps):
                torch.manual_seed(seed * 1_000_003 + step)  # what a method draws at random, per step
                chosen = [train[(step * batch_size + j) % len(train)] for j in range(batch_size)]
                inputs = next(batches(processor, chosen, batch_size, chat))
                with handle.suspended():
                    answer, teacher = _teacher(model, inputs, answer_tokens)
                full = _with_answer(inputs, answer)
                loss = distillation_loss(_answer_logits(model, full, answer.shape[1]), teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if (step + 1) % save_every == 0 or step + 1 == steps:
                    out.mkdir(parents=True, exist_ok=True)
                    torch.save({"step": step + 1, "losses": losses, "optimizer": optimizer.state_dict(),
                                "modules": [e.method.weights.state_dict() for e in stages], "before": before,
                                "seconds": time.perf_counter() - start_time},
                               state_path)
            bar.close()
            for parameter in parameters:
                parameter.requires_grad_(False)
            after = _held_out(model, handle, held_batches, answer_tokens)
            seconds = time.perf_counter() - start_time
            files = {}
            signature = weights_io.model_signature(handle.adapter)
            for entry in stages:
                method = entry.method
                shaping = method.weights_shaping()
                path = out / weights_io.weights_file_name(method.name, shaping)
                files[entry.stage.label()] = weights_io.save(
                    path, method.name, shaping, signature, method.weights,
                    {"fit": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                             "answer_tokens": answer_tokens, "final_loss": losses[-1] if losses else None,
                             "held_out_loss": after[0], "agreement": after[1]}})
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    return FitReport(files, steps, batch_size, seconds, losses, before[0], after[0], before[1], after[1])


@torch.no_grad()
def _held_out(model: Any, handle: Any, held: list[dict[str, torch.Tensor]], answer_tokens: int) -> tuple[float, float]:
    """Mean distillation loss and greedy agreement with the teacher on the held-out batches."""
    losses, agree, total = [], 0, 0
    for inputs in held:
        with handle.suspended():
            answer, teacher = _teacher(model, inputs, answer_tokens)
        student = _answer_logits(model, _with_answer(inputs, answer), answer.shape[1])
        losses.append(float(distillation_loss(student, teacher)))
        agree += int((student.argmax(-1) == teacher.argmax(-1)).all(-1).sum())
        total += answer.shape[0]
    return sum(losses) / max(len(losses), 1), agree / max(total, 1)


def write_card(out_dir: str | Path, report: FitReport, stack_source: str, model: str,
               accuracy: dict[str, float] | None = None) -> Path:
    """``FIT.md`` in ``out_dir``: what was fitted, how, and what it measured."""
    lines = [f"# Fitted weights for `{stack_source}` on `{model}`", "",
             "| | |", "| --- | --- |",
             f"| steps x batch | {report.steps} x {report.batch_size} |",
             f"| time | {report.seconds / 60:.1f} min |",
             f"| final training loss | {report.losses[-1]:.4f} |" if report.losses else "| final training loss | - |",
             f"| held-out distillation loss | {report.held_out_loss_before:.4f} -> {report.held_out_loss_after:.4f} |",
             f"| held-out greedy agreement with the teacher | {report.agreement_before:.1%} -> "
             f"{report.agreement_after:.1%} |"]
    if accuracy:
        lines.append(f"| accuracy ({accuracy['questions']} {accuracy['split']} questions) | "
                     f"{accuracy['before']:.1%} -> {accuracy['after']:.1%} |")
    lines += ["", "Files:", ""] + [f"- `{label}`: `{path.name}`" for label, path in report.files.items()]
    path = Path(out_dir) / CARD_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (Path(out_dir) / "fit.json").write_text(json.dumps({
        "steps": report.steps, "batch_size": report.batch_size, "seconds": report.seconds,
        "losses": report.losses, "held_out_loss": [report.held_out_loss_before, report.held_out_loss_after],
        "agreement": [report.agreement_before, report.agreement_after], "accuracy": accuracy,
        "files": {label: p.name for label, p in report.files.items()}}, indent=2), encoding="utf-8")
    return path


__all__ = ["FitReport", "distillation_loss", "fit", "write_card"]
