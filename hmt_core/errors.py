"""Typed errors of the HMT engine. The service maps each to one HTTP status."""

from __future__ import annotations


class HMTError(Exception):
    """Base class: every error hmt_core raises on purpose."""


class InvalidInputError(HMTError, ValueError):
    """The caller's input is unusable: empty, out of vocabulary, bad parameters."""


class CorruptStateError(HMTError, ValueError):
    """Serialized session bytes are truncated, tampered with or not a session at all."""


class ModelMismatchError(HMTError, ValueError):
    """A session state was made by another model (fingerprint differs)."""


class CheckpointError(HMTError, ValueError):
    """A checkpoint cannot be loaded: unknown layout, missing or misshapen weights."""


class BackboneFetchError(CheckpointError):
    """A backbone source cannot be fetched (no network, no pip, no such file); the message says how by hand."""


class BackboneChecksumError(CheckpointError):
    """A backbone file is not the pinned one: a damaged or different download, or a modified cache."""
