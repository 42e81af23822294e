"""One compressed prefill, as a plain object: the pre-LLM pipeline (encoder -> ``post_encoder`` ->
projector -> ``query_conditioned``), the packed sequence, and the decoder layers with the
``decoder_layer`` stages deciding before each what is dropped (``Keep``) or routed around it
(``Route``). :meth:`Prefill.run` returns the model's output and a :class:`PrefillOutcome` (what each
stage did, the token counts cost models need, the trace); it keeps nothing once it returns, and
knows nothing of how it was reached (:mod:`tokenpress.runtime.interception` intercepts the model's forward and
stores the outcome on the handle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import TYPE_CHECKING, Any

import torch

from tokenpress.core.decisions import Keep, Merge, Route
from tokenpress.core.errors import PluginError
from tokenpress.core.flops import adapter_widths, stage_flops
from tokenpress.core.method import PRE_LLM_POINTS, Method
from tokenpress.core.signals import as_requests, keyed
from tokenpress.core.tokens import TokenState, pack_index
from tokenpress.core.weights import follow
from tokenpress.runtime.cache import CompressedCache, DecodeState
from tokenpress.runtime.context import DecoderContext, StageContext
from tokenpress.runtime.scorer import Scorer
from tokenpress.runtime.sequence import Sequence, first_members, next_positions

if TYPE_CHECKING:
    from tokenpress.core.registry import Registry
    from tokenpress.core.stack import Stage
    from tokenpress.runtime.adapter import ModelAdapter


@dataclass
class StageRecord:
    """What one stage did at the last prefill: tokens in and out per sample (visual tokens)."""

    stage: str
    method: str
    point: str
    layer: int | None
    tokens_in: list[int]
    tokens_out: list[int]
    action: str = "transform"  # transform | keep | route
    own_flops: list[float] = field(default_factory=list)  # per sample: the stage's own modules (pre-LLM)
    block: int | None = None  # the encoder block of a stage acting inside the encoder

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StageEntry:
    """An attached stage: its validated spec and its method instance."""

    stage: Stage
    method: Method

    def hook(self, point: str) -> Callable[..., Any]:
        return getattr(self.method, point)


#: How a stage's hook is called: ``(entry, point, payload, call, layer=None)`` returns ``call(payload)``'s
#: result, wrapped by whatever observes stages (see :func:`observed_runner`).
StageRunner = Callable[..., Any]


def observed_runner(registry: Registry) -> StageRunner:
    """A :data:`StageRunner` calling each hook through ``registry``'s ``tokenpress_run_stage`` observers
    (profiling, tracing), as an attached model does."""
    def run(entry: StageEntry, point: str, payload: Any, call: Callable[[Any], Any], layer: int | None = None) -> Any:
        return registry.plugin_manager.hook.tokenpress_run_stage(
            stage=entry.stage, method=entry.method, point=point, payload=payload, call=call, layer=layer)
    return run


def run_token_stage(entry: StageEntry, point: str, tokens: TokenState, context: StageContext,
                    states: dict[str, dict[str, Any]], run_stage: StageRunner, layer: int | None = None) -> TokenState:
    """One ``post_encoder`` / ``projector`` / ``query_conditioned`` stage on ``tokens``: ``context`` set to
    the stage (and to what its method's stages share, kept in ``states``), the hook called through
    ``run_stage``, its result checked to be tokens."""
    context.stage = entry.stage
    context.state = states.setdefault(entry.stage.method, {})
    hook = entry.hook(point)
    result = run_stage(entry, point, tokens, lambda state: hook(tokens=state, context=context), layer=layer)
    if not isinstance(result, TokenState):
        raise PluginError(f"stage {entry.stage.label()} returned {type(result).__name__}, not a TokenState")
    return result


@dataclass
class PrefillResult:
    sequence: Sequence
    key_valid: list[torch.Tensor] = field(default_factory=list)
    key_positions: list[torch.Tensor] = field(default_factory=list)  # per layer: (R, B, S) positions of its keys
    next_position: list[torch.Tensor] = field(default_factory=list)
    visual_per_layer: list[torch.Tensor] = field(default_factory=list)
    padded: list[bool] = field(default_factory=list)  # per layer: whether its keys hold padding slots


@dataclass
class PrefillStats:
    """Token counts of the last compressed prefill, per sample: what cost models need."""

    visual_in: list[int]  # visual tokens the encoder produces uncompressed (its patches, before any stage)
    projected: list[int]  # tokens that went through the projector
    layer_tokens: list[list[int]]  # per layer, per sample: tokens (text + visual) each decoder layer processed
    layer_visual: list[list[int]]  # per layer, per sample: visual tokens each decoder layer processed
    #: When stages acted inside the encoder: [block] -> (tokens its attention saw, tokens its MLP saw) per
    #: encoder run (image or tile), class token not counted; None when the encoder ran as the model's own.
    encoder_blocks: list[tuple[list[int], list[int]]] | None = None


def prompt_fingerprints(input_ids: torch.Tensor, valid: torch.Tensor, prompt_length: int) -> list[int]:
    """A number per sample that depends only on its real prompt tokens (so alone == batched); read
    with the prompt's layout, before the encoder runs."""
    keys = []
    for ids, mask in zip(input_ids[:, :prompt_length].tolist(), valid[:, :prompt_length].tolist(), strict=True):
        key = 1469598103934665603
        for token, real in zip(ids, mask, strict=True):
            if real:
                key = ((key ^ (token + 1)) * 1099511628211) % (2**61 - 1)
        keys.append(key)
    return keys


@dataclass
class PrefillOutcome:
    """What one compressed prefill did (the handle keeps the last one)."""

    records: list[StageRecord]  # what each stage did, in order
    stats: PrefillStats
    trace: list[tuple[str, torch.Tensor]] | None = None  # (label, patch owners) at each step, when traced
    trace_grids: torch.Tensor | None = None  # (images, 3) original (t, h, w) grids of the traced prefill


class DeferredCounts:
    """Token counts of one prefill (device tensors), read to the host together once its last layer
    has been queued: one device-to-host copy per prefill instead of one per stage and layer."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._fills: list[Callable[[list[int]], None]] = []

    def later(self, counts: torch.Tensor, fill: Callable[[list[int]], None]) -> None:
        """Call ``fill`` with ``counts`` (1-D) as Python ints when :meth:`read` runs."""
        self._tensors.append(counts.reshape(-1).long())
        self._fills.append(fill)

    def into(self, values: list[int], counts: torch.Tensor) -> None:
        """Make the list ``values`` (in place) ``counts``, as Python ints."""

        def fill(read: list[int]) -> None:
            values[:] = read

        self.later(counts, fill)

    def read(self) -> None:
        if not self._tensors:
            return
        flat = torch.cat([tensor.to(self._tensors[0].device) for tensor in self._tensors]).tolist()
        start = 0
        for tensor, fill in zip(self._tensors, self._fills, strict=True):
            fill(flat[start:start + tensor.numel()])
            start += tensor.numel()
        self._tensors, self._fills = [], []


class Prefill:
    """One compressed prefill of ``entries`` (the attached stages) on ``adapter``'s model.

    ``run_stage`` calls a stage's hook (through the observers' ``tokenpress_run_stage`` wrappers);
    ``compact`` lays out positions compactly; ``trace`` records patch owners at every step.
    """

    def __init__(self, adapter: ModelAdapter, entries: list[StageEntry],
                 run_stage: StageRunner, *, compact: bool = False,
                 trace: bool = False) -> None:
        self.adapter = adapter
        self.entries = entries
        self._run_stage = run_stage
        self.compact = compact
        self.trace: list[tuple[str, torch.Tensor]] | None = [] if trace else None
        self.final_tokens: TokenState | None = None
        #: Per method name: what its stages share during this prefill (``context.state``).
        self.states: dict[str, dict[str, Any]] = {}
        #: (B, slot_count): the layer-0 slot standing for each layer-0 slot now (merges move it), for traces.
        self.representative: torch.Tensor | None = None
        self.initial: Sequence | None = None  # the sequence entering decoder layer 0

    def state(self, entry: StageEntry) -> dict[str, Any]:
        return self.states.setdefault(entry.stage.method, {})

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, use_cache: bool,
            media: dict[str, Any], prompt_length: int | None) -> tuple[Any, PrefillOutcome]:
        """The model's output for the prompt (hidden states, cache) and what the prefill did."""
        adapter = self.adapter
        for entry in self.entries:  # the methods' own weights on the model's current device and dtype
            if entry.method.weights is not None:
                follow(entry.method.weights, adapter.model)
        batch, columns = input_ids.shape
        device = input_ids.device
        records: list[StageRecord] = []
        valid_in = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        prompt_length = min(prompt_length or columns, columns)
        sample_keys = prompt_fingerprints(input_ids, valid_in, prompt_length)

        requests = list(dict.fromkeys(request for entry in self.entries  # each distinct request once
                                      for request in as_requests(entry.method.required_signals())))
        served = {request: adapter.served_signal(request) for request in requests}  # what the family computes
        requests = list(dict.fromkeys(served.values()))
        inside = InsideEncoderStages(adapter, [entry for entry in self.entries if entry.stage.inside_encoder],
                                     self._run_stage, self.states, sample_keys)
        if inside.entries:
            adapter.media.pop("encoder_run", None)
            tokens, computed = adapter.encode_images(media, requests, inside)
        else:
            tokens, computed = adapter.encode_images(media, requests)
        signals = keyed({request: computed[concrete] for request, concrete in served.items()})
        spans = sorted(adapter.image_spans(input_ids, valid_in, tokens), key=lambda span: span.image)
        row_sample = [0] * tokens.num_images
        row_rank = [0] * tokens.num_images
        for index, span in enumerate(spans):
            rank = sum(1 for other in spans[:index] if other.sample == span.sample)
            for part, row in enumerate(span.rows):
                row_sample[row] = span.sample
                row_rank[row] = rank * 16 + part  # an image's rows (tiles) draw differently
        image_to_sample = torch.tensor(row_sample, dtype=torch.long, device=device)
        tokens = dc_replace(tokens, image_to_sample=image_to_sample)
        prompt_embeds = adapter.embed(input_ids)  # once, for the query_conditioned stages and the layout
        deferred = DeferredCounts()
        encoder_blocks = inside.finish(deferred, records, adapter.media.get("encoder_run"), spans, batch,
                                       self._own_flops)
        visual_in: list[int] = []
        # the patches each image had, whatever stages inside the encoder merged on the way
        deferred.into(visual_in, _per_sample(tokens.original_grid.prod(-1), image_to_sample, batch))
        projected = [0] * batch  # a stage that replaces the projector leaves it at zero
        trace_grids = None
        if self.trace is not None:
            self.trace.append(("encoder", tokens.owner))
            trace_grids = tokens.original_grid

        def project(state: TokenState) -> TokenState:
            """The model's projector, applied once (tokens already in LLM space pass through)."""
            if state.space == "llm":
                return state
            deferred.into(projected, _per_sample(state.counts(), state.image_to_sample, batch))
            return adapter.project(state)

        context = StageContext(stage=None, signals=signals, project=project, sample_keys=sample_keys,
                               image_rank=row_rank, image_samples=row_sample,
                               adapter=adapter)  # type: ignore[arg-type]

        for point in PRE_LLM_POINTS:
            if point == "query_conditioned":
                tokens = project(tokens)
                context.prompt_embeddings = self._prompt_embeddings(input_ids, valid_in, prompt_length, row_sample,
                                                                    prompt_embeds)
            for entry in self.entries:
                if entry.stage.point != point or entry.stage.inside_encoder:
                    continue
                rows_before = tokens.counts()
                samples_before = tokens.image_to_sample
                space_before = tokens.space
                tokens = run_token_stage(entry, point, tokens, context, self.states, self._run_stage)
                record = StageRecord(entry.stage.label(), entry.stage.method, point, None, [], [])
                records.append(record)
                deferred.into(record.tokens_in, _per_sample(rows_before, samples_before, batch))
                deferred.into(record.tokens_out, _per_sample(tokens.counts(), tokens.image_to_sample, batch))
                self._own_flops(deferred, record, entry.method, rows_before, tokens.counts(), tokens.image_to_sample,
                                batch, point, space_before)
                if self.trace is not None:
                    self.trace.append((entry.stage.label(), tokens.owner))

        sequence = adapter.build_sequence(input_ids, attention_mask, tokens, prompt_length, self.compact, spans,
                                          prompt_embeds)
        # what the placeholders hold, per sample (sized by host numbers: no device read)
        entering, _ = pack_index(sequence.valid & sequence.is_visual, width=max(sequence.visual_lengths, default=0))
        width = sequence.hidden.shape[-1]
        visual_hidden = torch.gather(sequence.hidden, 1, entering.unsqueeze(-1).expand(-1, -1, width))
        image_features = [row[:count] for row, count in zip(visual_hidden, sequence.visual_lengths, strict=True)]
        cache = CompressedCache() if use_cache else None
        self.final_tokens = tokens
        result = self.run_decoder(sequence, cache, sample_keys, records, deferred)
        final = result.sequence
        hidden = adapter.final_norm(final.hidden)

        position_offset = result.next_position[0] - valid_in.sum(-1)
        output = hidden.new_zeros(batch, columns, hidden.shape[-1])
        columns_out = torch.where(final.valid, final.column, columns)  # padding slots go to a dump column
        output = torch.cat([output, output.new_zeros(batch, 1, hidden.shape[-1])], dim=1)
        output.scatter_(1, columns_out.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), hidden)
        output = output[:, :columns]
        if cache is not None:
            cache.tokenpress_state = DecodeState(result.key_valid, result.next_position, columns, position_offset,
                                                 result.padded, result.key_positions)
        layer_tokens: list[list[int]] = [[] for _ in result.key_valid]
        layer_visual: list[list[int]] = [[] for _ in result.visual_per_layer]
        for values, valid in zip(layer_tokens, result.key_valid, strict=True):
            deferred.into(values, valid.sum(-1))
        for values, count in zip(layer_visual, result.visual_per_layer, strict=True):
            deferred.into(values, count)
        deferred.read()
        stats = PrefillStats(visual_in, projected, layer_tokens, layer_visual, encoder_blocks)
        outcome = PrefillOutcome(records, stats, self.trace, trace_grids)
        return adapter.make_output(output, cache, image_features, position_offset), outcome

    def _own_flops(self, deferred: DeferredCounts, record: StageRecord, method: Method, rows_before: torch.Tensor,
                   rows_after: torch.Tensor, row_sample: torch.Tensor, batch: int, point: str = "post_encoder",
                   space: str = "encoder") -> None:
        """``record.own_flops``, per sample: FLOPs of a pre-LLM stage's own modules (``Method.stage_flops``)
        on each row (``row_sample``: the sample of each) of a stage at ``point`` receiving tokens in
        ``space``, once the counts are read."""
        record.own_flops = [0.0] * batch
        if type(method).stage_flops is Method.stage_flops:
            return
        widths = adapter_widths(self.adapter)
        images = rows_before.numel()

        def fill(read: list[int]) -> None:
            before, after, samples = read[:images], read[images:2 * images], read[2 * images:]
            for sample, flops in zip(samples, stage_flops(method, before, after, widths, point, space), strict=True):
                record.own_flops[sample] += flops

        deferred.later(torch.cat([rows_before, rows_after, row_sample.to(rows_before.device)]), fill)

    def _prompt_embeddings(self, input_ids: torch.Tensor, valid: torch.Tensor, prompt_length: int,
                           row_sample: list[int], embeds: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """The embedded prompt text of each image row's sample, looked up without a device read: its
        columns are found here, with the prompt's layout, before any stage runs."""
        text = valid & ~torch.isin(input_ids, torch.tensor(self.adapter.placeholder_ids(), device=input_ids.device))
        text[:, prompt_length:] = False
        columns = [torch.nonzero(row).flatten() for row in text]

        def lookup(image_index: int) -> torch.Tensor:
            sample = row_sample[image_index]
            return embeds[sample].index_select(0, columns[sample])

        return lookup

    def run_decoder(self, sequence: Sequence, cache: CompressedCache | None, sample_keys: list[int],
                    records: list[StageRecord], deferred: DeferredCounts) -> PrefillResult:
        """Run every decoder layer at prefill, applying the decoder_layer stages before each."""
        adapter = self.adapter
        result = PrefillResult(sequence)
        previous: Sequence | None = None
        initial = self.initial = sequence
        if self.trace is not None:
            self.representative = sequence.slot_id.clone()
        for layer in range(adapter.num_layers):
            route: torch.Tensor | None = None
            for entry in self.entries:
                if entry.stage.point != "decoder_layer" or layer not in entry.stage.layers:
                    continue
                context = DecoderContext(entry.stage, layer, adapter.num_layers, sequence,
                                         Scorer(adapter, layer, sequence, previous), sample_keys, adapter, initial,
                                         self.state(entry))
                before = list(sequence.visual_lengths)
                hook = entry.hook("decoder_layer")
                decision = self._run_stage(entry, "decoder_layer", context, lambda ctx, hook=hook: hook(context=ctx),
                                           layer=layer)
                if decision is None:
                    continue
                if isinstance(decision, Keep | Merge):
                    if isinstance(decision, Keep):
                        sequence, kept, picked = sequence.pack(decision.mask.bool() | ~sequence.is_visual)
                    else:
                        self._follow_merge(sequence, decision)
                        sequence, kept, picked = sequence.merge(decision.group, decision.weight, decision.groups)
                    if route is not None:  # an earlier stage at this layer routed: carry its choice over
                        route = torch.gather(route, 1, kept) & picked
                    if self.compact:
                        sequence = sequence.with_positions(adapter.compact_positions(sequence))
                    records.append(StageRecord(entry.stage.label(), entry.stage.method, "decoder_layer", layer,
                                               before, list(sequence.visual_lengths),
                                               "keep" if isinstance(decision, Keep) else "merge"))
                elif isinstance(decision, Route):
                    chosen = decision.mask.bool() | ~sequence.is_visual
                    route = chosen if route is None else route & chosen
                    record = StageRecord(entry.stage.label(), entry.stage.method, "decoder_layer", layer, before, [],
                                         "route")
                    records.append(record)
                    deferred.into(record.tokens_out, (route & sequence.is_visual & sequence.valid).sum(-1))
                else:
                    raise PluginError(f"stage {entry.stage.label()} returned {type(decision).__name__}; "
                                      "a decoder_layer hook returns Keep, Route, Merge or None")
            processed_seq, index, picked = (sequence, None, None) if route is None else sequence.pack(route)
            if self.trace is not None and any(
                    layer in e.stage.layers for e in self.entries if e.stage.point == "decoder_layer"):
                self.trace.append((f"layer {layer}", self._owners(processed_seq)))
            mask = adapter.layer_mask(layer, processed_seq)
            embeddings = adapter.position_embeddings(processed_seq.hidden, processed_seq.positions, layer)
            out = adapter.call_layer(layer, processed_seq.hidden, mask, processed_seq.positions, embeddings, cache)
            result.key_valid.append(processed_seq.valid)
            result.key_positions.append(processed_seq.positions)
            result.padded.append(processed_seq.padded)
            result.visual_per_layer.append((processed_seq.valid & processed_seq.is_visual).sum(-1))
            result.next_position.append(next_positions(processed_seq.positions, processed_seq.valid))
            previous = sequence
            sequence = sequence.with_hidden(out) if index is None else sequence.scatter_hidden(index, picked, out)
            sequence = adapter.after_layer(layer, sequence)
        result.sequence = sequence
        return result

    def _follow_merge(self, sequence: Sequence, decision: Merge) -> None:
        """Keep the trace's representatives: every layer-0 slot a merged member stood for now follows the
        merged token (its first member)."""
        if self.representative is None:
            return
        length = sequence.length
        member = sequence.is_visual & sequence.valid & (decision.group >= 0)
        slot = torch.where(member, decision.group, decision.groups)
        first = first_members(member, slot, decision.groups)
        lead = torch.gather(sequence.slot_id, 1, torch.gather(first, 1, slot).clamp_max(length - 1))
        count = self.representative.shape[1]
        moved = torch.arange(count + 1, device=member.device).expand(member.shape[0], -1).clone()
        moved.scatter_(1, torch.where(member, sequence.slot_id, count), torch.where(member, lead, count))
        self.representative = torch.gather(moved, 1, self.representative)

    def _owners(self, sequence: Sequence) -> torch.Tensor:
        """Patch owners among the visual tokens that ``sequence`` still holds (a merged token owns its
        members' patches)."""
        tokens = self.final_tokens
        alive = (sequence.visual_id >= 0) & sequence.valid
        present = torch.zeros(tokens.num_images * tokens.num_slots, dtype=torch.bool, device=tokens.owner.device)
        present[sequence.visual_id[alive]] = True
        owners = tokens.patch_owner(present.view(tokens.num_images, tokens.num_slots))
        if self.representative is None or bool((self.representative == torch.arange(
                self.representative.shape[1], device=owners.device)).all()):
            return owners
        return self._merged_owners(owners, present)

    def _merged_owners(self, owners: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``owners`` with each patch of a merged-away token given to the token it merged into (when both
        are of the same image; a trace draws one image's patches)."""
        tokens, initial = self.final_tokens, self.initial
        visual = (initial.visual_id >= 0) & initial.valid
        table = torch.arange(present.numel() + 1, device=present.device)
        represented = torch.gather(initial.visual_id, 1, self.representative)
        table.scatter_(0, torch.where(visual, initial.visual_id, present.numel()).flatten(), represented.flatten())
        slots = tokens.num_slots
        base = torch.arange(tokens.num_images, device=present.device).unsqueeze(1) * slots
        own = tokens.owner.clamp_min(0) + base
        target = table[own]
        same = (target // slots == base) & present.flatten()[target.clamp_min(0)] & (tokens.owner >= 0)
        return torch.where((owners == -1) & same, target % slots, owners)


class InsideEncoderStages:
    """The stages that act inside the encoder, as the adapter's encoder loop calls them
    (:class:`tokenpress.runtime.encoder.InsideEncoder`): in stack order in each block they list, each call kept
    so that it can be recorded like every stage once the encoder rows are matched to samples
    (:meth:`finish`)."""

    def __init__(self, adapter: ModelAdapter, entries: list[StageEntry], run_stage: StageRunner,
                 states: dict[str, dict[str, Any]], sample_keys: list[int]) -> None:
        self.adapter = adapter
        self.entries = entries
        self.run_stage = run_stage
        self.states = states
        self.sample_keys = sample_keys
        self.layers = frozenset(layer for entry in entries for layer in entry.stage.layers)
        self.calls: list[tuple[StageEntry, int, torch.Tensor, torch.Tensor]] = []  # entry, block, in, out

    def __call__(self, block: Any, tokens: TokenState) -> TokenState:
        for entry in self.entries:
            if block.layer not in entry.stage.layers:
                continue
            context = StageContext(stage=entry.stage, signals={}, project=_no_projection, sample_keys=self.sample_keys,
                                   image_rank=[], image_samples=[], adapter=self.adapter, encoder_block=block)
            before = tokens
            tokens = run_token_stage(entry, "post_encoder", tokens, context, self.states, self.run_stage,
                                     layer=block.layer)
            if (tokens.space != "encoder" or tokens.num_images != before.num_images
                    or tokens.embeddings.shape[-1] != before.embeddings.shape[-1]):
                raise PluginError(f"stage {entry.stage.label()} inside encoder block {block.layer} must return the "
                                  "same rows of encoder-space tokens it received (select, keep or merge them)")
            self.calls.append((entry, block.layer, before.counts(), tokens.counts()))
        return tokens

    def finish(self, deferred: DeferredCounts, records: list[StageRecord], run: Any, spans: list[Any], batch: int,
               own_flops: Callable[..., None]) -> list[tuple[list[int], list[int]]] | None:
        """Record the calls per sample (the encoder rows now matched to samples through ``spans``; each
        stage's own FLOPs through ``own_flops``, :meth:`Prefill._own_flops`) and return the per-block token
        counts of the encoder run for the FLOPs model (None: no stage ran inside)."""
        if not self.entries or run is None:
            return None
        image_sample = {span.image: span.sample for span in spans}
        device = run.attention[0].device if run.attention else None
        row_sample = torch.tensor([image_sample[image] for image in run.row_images], dtype=torch.long, device=device)
        for entry, layer, counts_in, counts_out in self.calls:
            record = StageRecord(entry.stage.label(), entry.stage.method, "post_encoder", None, [], [], block=layer)
            records.append(record)
            deferred.into(record.tokens_in, _per_sample(counts_in, row_sample, batch))
            deferred.into(record.tokens_out, _per_sample(counts_out, row_sample, batch))
            own_flops(deferred, record, entry.method, counts_in, counts_out, row_sample, batch)
        blocks: list[tuple[list[int], list[int]]] = [([], []) for _ in run.attention]
        for (attention, mlp), entering, leaving in zip(blocks, run.attention, run.mlp, strict=True):
            deferred.into(attention, entering)
            deferred.into(mlp, leaving)
        return blocks


def _no_projection(tokens: TokenState) -> TokenState:
    raise PluginError("a stage inside the encoder cannot project its tokens (the encoder's blocks still follow)")


def _per_sample(counts: torch.Tensor, image_to_sample: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) long: the per-image ``counts`` summed over each sample's images (on their device)."""
    totals = torch.zeros(batch, dtype=torch.long, device=counts.device)
    totals.index_add_(0, image_to_sample, counts.long())
    return totals
