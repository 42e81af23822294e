"""pool: 2-D average/max pooling or bilinear resizing of each image's patch grid."""

from __future__ import annotations

from tokenpress import Method, hookimpl
from tokenpress_plugins.pool.method import Pool


@hookimpl
def tokenpress_register_methods() -> list[type[Method]]:
    return [Pool]


__all__ = ["Pool"]
