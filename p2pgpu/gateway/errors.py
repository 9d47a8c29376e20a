"""PLACEHOLDER: replaced by the codec branch's errors module on merge."""

from __future__ import annotations


class GatewayError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotReady(GatewayError):
    status = 503


class TooManyInferRequests(GatewayError):
    status = 429


class ModelNotFound(GatewayError):
    status = 404
