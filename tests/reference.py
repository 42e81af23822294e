"""An independent reference for decoder-side compression, written with the model's own modules only.

It runs a (single, unpadded) sequence through a Llama-style decoder layer by layer, dropping or
routing given token indices before given layers, with an explicit causal mask and explicit
positions. No tokenpress code is used, so agreeing with it means tokenpress does what it says.
"""

from __future__ import annotations

import torch


def manual_decoder(language_model, hidden: torch.Tensor, positions: torch.Tensor,
                   keep: dict[int, torch.Tensor] | None = None,
                   route: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-normed hidden states (1, N', D) and the positions of the tokens that survive.

    ``keep[l]``: indices (into the current sequence) kept from layer l on; ``route[l]``: indices that
    go through layer l while the rest skip it.
    """
    keep = keep or {}
    route = route or {}
    for index, layer in enumerate(language_model.layers):
        if index in keep:
            hidden, positions = hidden[:, keep[index]], positions[:, keep[index]]
        chosen = route.get(index)
        sub_hidden = hidden if chosen is None else hidden[:, chosen]
        sub_positions = positions if chosen is None else positions[:, chosen]
        count = sub_hidden.shape[1]
        mask = torch.full((count, count), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        cos_sin = language_model.rotary_emb(sub_hidden, sub_positions)
        out = layer(sub_hidden, attention_mask=mask, position_ids=sub_positions, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        if chosen is None:
            hidden = out
        else:
            hidden = hidden.clone()
            hidden[:, chosen] = out
    return language_model.norm(hidden), positions


def merged_embeddings(model, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """Text embeddings with the image placeholders replaced by ``image_features`` (LLaVA's own rule)."""
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


def llava_patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Encoder-space patch features the way LLaVA selects them (layer, CLS dropped)."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]
