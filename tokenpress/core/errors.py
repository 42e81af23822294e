"""Errors meant for people: one clear sentence, raised before the model is touched."""

from __future__ import annotations


class TokenpressError(Exception):
    """Base class of every error tokenpress raises on purpose (the CLI prints these as one line)."""


class StackError(TokenpressError, ValueError):
    """A stack file or dict is malformed: unknown method, bad parameter, stage at a wrong point..."""


class UnsupportedModelError(TokenpressError, TypeError):
    """No registered model adapter can handle the given model, or the model cannot run a stage."""


class PluginError(TokenpressError, RuntimeError):
    """A plugin is broken: duplicate name, bad registration, missing hook implementation."""


class CompressionError(TokenpressError, RuntimeError):
    """A compressed forward pass cannot proceed with the inputs it was given."""


class InputError(TokenpressError, ValueError):
    """A file or value given to tokenpress cannot be used: a missing or unreadable image, a model
    folder that does not load, an option out of range."""
