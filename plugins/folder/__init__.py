"""folder: FOLDER (Wang et al., *FOLDER: Accelerating Multi-modal Large Language Models with Enhanced
Performance*, ICCV 2025): ToMe's matching concentrated in the last encoder block(s), folded (several
matchings in one block) to merge many tokens at once, survivors kept in their order."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.folder.method import Folder


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [Folder]


__all__ = ["Folder"]
