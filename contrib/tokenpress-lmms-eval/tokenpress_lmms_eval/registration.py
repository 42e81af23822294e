"""What lmms-eval loads from the ``lmms_eval.models`` entry-point group: the ``tokenpress`` model's manifest.

Kept apart from :mod:`tokenpress_lmms_eval.model` because lmms-eval loads every entry point each time it
starts: naming the class by its path keeps torch and transformers out of that start until the model is used.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="tokenpress", simple_class_path="tokenpress_lmms_eval.model.TokenpressModel")
