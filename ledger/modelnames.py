"""What a registered model's name and version look like, and how a reference to a model is read.

One definition for the ledger (``RegisterModel`` is refused for a name it
does not accept), the node's API (``GET /ledger/models/{ref}``) and the CLI
(``p2pgpu model push --name``), so a name the CLI accepts is one the ledger
accepts.

Names and versions are lowercase ``[a-z0-9][a-z0-9._-]{0,63}``: safe in a URL
path, a file name and a shell word without quoting, and case cannot make two
names look alike. A name may not be 64 hexadecimal characters, so a
reference is never both a name and a model id. ``@`` is not in the alphabet:
``name@version`` is unambiguous.

Policy (enforced in :func:`ledger.transition.process_register_model`): the
first account to register a name owns it and all its versions; a version is
registered once and never changes; the name's *latest* version is the one
registered last (not a semantic-version comparison: the owner decides what
is newest by registering it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_NAME_LENGTH", "ModelRef", "is_model_id_text", "is_valid_model_name", "parse_model_ref"]

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MODEL_ID = re.compile(r"[0-9a-f]{64}")


def is_model_id_text(text: str) -> bool:
    """True for 64 lowercase hex characters: the text form of a model id."""
    return _MODEL_ID.fullmatch(text) is not None


def is_valid_model_name(text: str) -> bool:
    """True if ``text`` may be a model's name or version (the same alphabet for both)."""
    return _NAME.fullmatch(text) is not None and not is_model_id_text(text)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A reference to a registered model: by id, or by name and optionally version (None: the latest)."""

    model_id: bytes | None = None
    name: str | None = None
    version: str | None = None


def parse_model_ref(text: str) -> ModelRef:
    """``ID`` (64 hex), ``NAME`` or ``NAME@VERSION``; raises ``ValueError`` naming what is wrong."""
    if is_model_id_text(text):
        return ModelRef(model_id=bytes.fromhex(text))
    name, sep, version = text.partition("@")
    if not is_valid_model_name(name):
        raise ValueError(f"{name!r} is not a model id (64 hex digits) or a model name ([a-z0-9][a-z0-9._-]{{0,63}})")
    if sep and not is_valid_model_name(version):
        raise ValueError(f"{version!r} is not a model version ([a-z0-9][a-z0-9._-]{{0,63}})")
    return ModelRef(name=name, version=version if sep else None)
