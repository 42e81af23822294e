"""The model families shipped with tokenpress, one folder each: its adapter (a
:class:`~tokenpress.runtime.adapter.ModelAdapter`, everything model-specific), its FLOPs model (a
:class:`~tokenpress.core.flops.FamilyCosts`, the adapter's ``cost_model``) and its tiny test model
(``testbed``, the record the adapter names as ``test_family``).

Each is registered like a third party's family: through the ``tokenpress.families`` entry-point group
(pyproject.toml), so nothing below this layer imports a family. Families may share code (``clip``: the
CLIP-style towers of the LLaVA families; ``testbed``: what the tiny models share).
"""
