"""Methods with weights: ``torch.nn.Module`` parts a method owns, outside the model.

A method builds its parts in :meth:`~tokenpress.Method.build_weights` (an MLP after
pixel-unshuffle, learned queries, ...). The core keeps them out of the model's ``state_dict``
(they are never registered as submodules), moves them to the device and floating dtype of the
model's parameters before every compressed forward (so ``model.to(torch.float64)`` or ``.cuda()``
after attaching keeps working), loads them from ``params: {weights: PATH}``, and drops them on
detach (:meth:`~tokenpress.Method.teardown`).

A weights file is safetensors with a JSON header (``"tokenpress"`` metadata key): the method, its
parameters that shape the parts, the model they were fitted for (a hash of the decoder's and the
encoder's sizes, and a fingerprint of the input embeddings) and whatever the writer adds (steps,
loss). A file for another method or another model is refused in one sentence.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tokenpress.core.errors import InputError
from tokenpress.zoo import ZOO_DIR, zoo_path

FORMAT = "tokenpress-method-weights"
VERSION = 1
FINGERPRINT_RTOL = 1e-2


def follow(module: nn.Module, model: nn.Module) -> None:
    """Put ``module``'s parameters and buffers on the device of ``model``'s floating parameters,
    floating ones in their dtype (a no-op when they are there already)."""
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    if reference is None:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        wanted = reference.dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.device != reference.device or tensor.dtype != wanted:
            module.to(device=reference.device, dtype=reference.dtype)
            return


def resolve(value: str, method: str, shaping: dict[str, Any], model: Any = None) -> Path:
    """Where ``params.weights`` points: ``zoo`` -> the weights shipped beside the zoo proxy ``model``
    was loaded from, ``zoo:NAME`` -> beside that proxy (``pixel_unshuffle-ratio2.safetensors``, for
    this method and shaping); anything else is a file path."""
    if value == "zoo":
        loaded_from = Path(str(getattr(model, "name_or_path", "") or "."))
        if loaded_from.parent.resolve() != ZOO_DIR.resolve():
            raise InputError("params.weights: 'zoo' means the weights shipped with a zoo proxy, and this model was "
                             "not loaded from one; give a weights file (`tokenpress fit`)")
        return loaded_from / weights_file_name(method, shaping)
    if not value.startswith("zoo:"):
        return Path(value)
    try:
        folder = zoo_path(value)
    except ValueError as exc:
        raise InputError(f"params.weights: {exc}") from None
    return folder / weights_file_name(method, shaping)


def weights_file_name(method: str, shaping: dict[str, Any]) -> str:
    """The file name of a method's weights for one shaping: ``METHOD[-KEYVALUE...].safetensors``."""
    parts = [method] + [f"{key}{value}" for key, value in sorted(shaping.items()) if value is not None]
    return "-".join(parts) + ".safetensors"


class PatchNorm(nn.Module):
    """``norm`` applied to each ``width``-wide chunk of the last dimension (one patch of a merged unit)."""

    def __init__(self, norm: nn.Module, width: int) -> None:
        super().__init__()
        self.norm, self.width = norm, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.norm(x.reshape(*shape[:-1], shape[-1] // self.width, self.width)).reshape(shape)


def projector_copy(projector: Any, windows: int = 1) -> nn.Sequential:
    """A float32 copy of the model's projector (:class:`~tokenpress.runtime.adapter.ProjectorMLP`) that
    takes ``windows`` encoder tokens concatenated and projects their mean: the first layer's weight is
    repeated ``windows`` times and divided by ``windows``. At ``windows=1`` it is the projector itself.
    What a method that replaces the projector starts from, so that fitting learns only the change."""

    first, second = projector.first, projector.second
    layers: list[nn.Module] = []
    if projector.norm is not None:
        layers.append(PatchNorm(copy.deepcopy(projector.norm).float(), int(projector.norm_width)))
    merged = nn.Linear(first.in_features * windows, first.out_features)
    with torch.no_grad():
        merged.weight.copy_(first.weight.detach().float().repeat(1, windows) / windows)
        merged.bias.copy_(first.bias.detach().float() if first.bias is not None else torch.zeros(first.out_features))
    layers += [merged, copy.deepcopy(projector.act), copy.deepcopy(second).float()]
    return nn.Sequential(*layers)


def seeded_mlp(in_width: int, hidden: int, out_width: int, seed: int) -> nn.Sequential:
    """Linear -> GELU -> Linear with uniform(+-1/sqrt(fan_in)) weights from ``seed`` and zero biases: the
    start of a method's MLP where the model's projector cannot be copied. Seeded so that two attaches
    start from the same weights; the global RNG is not touched."""
    generator = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(in_width, hidden), nn.GELU(), nn.Linear(hidden, out_width))
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            bound = layer.in_features ** -0.5
            layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
            layer.bias.zero_()
    return mlp


def starting_projector(adapter: Any, seed: int) -> nn.Sequential:
    """What a method that replaces the projector maps encoder tokens to the LLM with at first: a copy of
    the model's own projector where it is a two-layer MLP to the LLM width, else :func:`seeded_mlp`."""
    llm_width = adapter.text_config.hidden_size
    projector = adapter.projector_mlp()
    if projector is not None and projector.second.out_features == llm_width:
        return projector_copy(projector)
    return seeded_mlp(adapter.encoder_width(), llm_width, llm_width, seed)


def model_signature(adapter: Any, method: Any = None) -> dict[str, Any]:
    """The sizes a method's weights depend on, a fingerprint of the model's own embeddings and, when
    ``method`` gives one (:meth:`~tokenpress.Method.weights_fingerprint`), of the model weights it reads."""
    text = adapter.text_config
    vision = getattr(adapter.model.config, "vision_config", None)
    sizes = {
        "family": adapter.family,
        "text_hidden_size": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "vocab_size": getattr(text, "vocab_size", None),
        "vision_hidden_size": getattr(vision, "hidden_size", None),
        "vision_layers": getattr(vision, "num_hidden_layers", getattr(vision, "depth", None)),
    }
    embeddings = adapter.model.get_input_embeddings().weight
    signature = {"sizes": sizes, "sizes_hash": _hash(sizes),
                 "embedding_fingerprint": float(embeddings.detach().double().abs().sum())}
    own = method.weights_fingerprint(adapter) if method is not None else {}
    if own:
        signature["method_fingerprint"] = own
    return signature


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def save(path: str | Path, method: str, shaping: dict[str, Any], signature: dict[str, Any], module: nn.Module,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``module``'s state (float32, CPU) and the header to ``path``."""

    header = {"format": FORMAT, "version": VERSION, "method": method, "params": shaping, "model": signature,
              **(extra or {})}
    tensors = {name: value.detach().to(torch.float32).contiguous().cpu() if value.is_floating_point()
               else value.detach().contiguous().cpu() for name, value in module.state_dict().items()}
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata={"tokenpress": json.dumps(header, sort_keys=True)})
    file.chmod(0o644)
    return file


def read_file_header(path: str | Path, where: str, kind: str, make_with: str) -> dict[str, Any]:
    """The JSON header (safetensors metadata ``"tokenpress"``) of a tokenpress file, no tensors read;
    a missing, unreadable or foreign file is one sentence starting with ``where`` and the path."""

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{where}{path}: no such {kind} file (make one with `{make_with}`)")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a file it cannot parse
        raise InputError(f"{where}{path}: not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
    try:
        return json.loads(metadata["tokenpress"])
    except (KeyError, json.JSONDecodeError):
        raise InputError(f"{where}{path}: a safetensors file without a tokenpress header") from None


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a weights file (no tensors read)."""
    header = read_file_header(path, "params.weights: ", "weights", "tokenpress fit")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise InputError(f"params.weights: {path}: not tokenpress method weights (format {header.get('format')!r}, "
                         f"version {header.get('version')})")
    return header


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor of a weights file (no tensor read)."""

    with safe_open(str(path), framework="pt") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def load(path: str | Path, method: str, shaping: dict[str, Any], signature: dict[str, Any],
         module: nn.Module, *, made_by: str = "tokenpress fit", partial: bool = False) -> dict[str, Any]:
    """Load the weights at ``path`` into ``module`` after checking they were fitted for this method,
    these shaping parameters and this model; returns the header. ``made_by`` is the command a refusal
    names; ``partial`` lets the file hold more parts than ``module`` (those are not read)."""

    header = read_header(path)
    where = f"params.weights: {path}"
    if header.get("method") != method:
        raise InputError(f"{where}: these are weights of method {header.get('method')!r}, not {method!r}")
    if header.get("params") != shaping:
        raise InputError(f"{where}: fitted with {header.get('params')}, but this stage has {shaping}")
    made_for = header.get("model", {})
    if made_for.get("sizes_hash") != signature["sizes_hash"]:
        raise InputError(f"{where}: made for another model ({_describe(made_for.get('sizes', {}))}), not this one "
                         f"({_describe(signature['sizes'])}); make weights for it with `{made_by}`")
    if not _same_fingerprints(made_for, signature):
        raise InputError(f"{where}: made for other weights of the same architecture; make weights for this "
                         f"checkpoint with `{made_by}`")
    tensors = load_file(str(path))
    expected = module.state_dict()
    extra = set(tensors) - set(expected)
    if (set(expected) - set(tensors) or (extra and not partial)
            or any(tensors[k].shape != expected[k].shape for k in expected)):
        raise InputError(f"{where}: its tensors do not match this method's parts (another tokenpress version?)")
    tensors = {k: v for k, v in tensors.items() if k in expected}
    module.load_state_dict({k: v.to(expected[k].device, expected[k].dtype) for k, v in tensors.items()})
    return header


def _same_fingerprints(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the numbers both signatures have (the embeddings', the method's own) agree, within
    :data:`FINGERPRINT_RTOL` (a checkpoint loaded in another dtype still matches)."""
    pairs = [(stored.get("embedding_fingerprint"), current.get("embedding_fingerprint"))]
    mine = current.get("method_fingerprint", {})
    pairs += [(value, mine[key]) for key, value in stored.get("method_fingerprint", {}).items() if key in mine]
    for old, new in pairs:
        if old is None or new is None:
            continue
        olds, news = (old, new) if isinstance(old, list) else ([old], [new])
        if not all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL) for a, b in zip(olds, news, strict=True)):
            return False
    return True


def _describe(sizes: dict[str, Any]) -> str:
    if not sizes:
        return "unknown"
    return (f"{sizes.get('family')}, text hidden {sizes.get('text_hidden_size')} x {sizes.get('text_layers')} layers, "
            f"vision hidden {sizes.get('vision_hidden_size')}")


__all__ = ["PatchNorm", "follow", "load", "model_signature", "projector_copy", "read_file_header", "read_header",
           "resolve", "save", "seeded_mlp", "starting_projector", "tensor_shapes", "weights_file_name"]
