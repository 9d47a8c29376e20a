"""The Python SDK for a p2pgpu node's API: :class:`Client` (blocking) and :class:`AsyncClient` (Trio or asyncio).

Inference through the node's Open Inference Protocol v2 routes (tensors
in the binary extension, never JSON-encoded), tasks (submit, follow,
fetch the result), and the model registry (push a model file validated
here, list, look up). Errors are one tree under :class:`P2PGPUError`
(:mod:`p2pgpu.client.errors`). Importing this package loads neither
TensorFlow nor the node's HTTP server; a model file is read as data.

Usage is in ``docs/sdk.md``.
"""

from __future__ import annotations

from p2pgpu.api.types import TaskView
from p2pgpu.client._transport import DEFAULT_URL
from p2pgpu.client.aio import AsyncClient
from p2pgpu.client.errors import (
    AuthError,
    BadResponse,
    Forbidden,
    InsufficientFunds,
    InvalidInput,
    InvalidModelFile,
    ModelNotFound,
    ModelPushFailed,
    ModelUnavailable,
    NodeUnreachable,
    NotFound,
    NotReady,
    P2PGPUError,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServerError,
    TaskNotFound,
    Unauthorized,
    Unavailable,
    Unprocessable,
    WaitTimeout,
)
from p2pgpu.client.sync import Client
from p2pgpu.client.v2 import DATATYPES

__all__ = [
    "DATATYPES",
    "DEFAULT_URL",
    "AsyncClient",
    "AuthError",
    "BadResponse",
    "Client",
    "Forbidden",
    "InsufficientFunds",
    "InvalidInput",
    "InvalidModelFile",
    "ModelNotFound",
    "ModelPushFailed",
    "ModelUnavailable",
    "NodeUnreachable",
    "NotFound",
    "NotReady",
    "P2PGPUError",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "TaskNotFound",
    "TaskView",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "WaitTimeout",
]
