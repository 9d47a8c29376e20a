"""Tasks by model: a ``keras_infer`` or ``stream_infer`` spec that names a registered model instead of carrying it.

A client's spec holds the model's id (param ``model_id``, its bundle's hash
in hex) and the data input ``x`` (a batch task; a stream task's spec holds
none, its items come one by one); the weights stay on the data plane. The
provider, once it holds the bundle, runs the spec :func:`expand_model_spec`
makes: today's ``model`` + ``weight_NNN`` inputs beside ``x`` (if any), the same
params less ``model_id``, the same requirements and limits. Kernels, the
runtime and its workers are unchanged; only this module knows both forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernels.bundle import ModelBundle, bundle_to_inputs, model_id
from kernels.errors import InputMismatch, InvalidParams
from kernels.jobspec import JobSpec
from kernels.spec import make_spec, validate_spec

__all__ = ["BY_MODEL_KERNELS", "expand_model_spec", "make_model_spec", "spec_model_id"]

BY_MODEL_KERNELS = frozenset({"keras_infer", "stream_infer"})
"""Kernels whose spec may name a model by id."""


def spec_model_id(spec: JobSpec) -> bytes | None:
    """The registered model ``spec`` names (32 bytes), or None for a spec that carries its model (or none)."""
    if spec.kernel not in BY_MODEL_KERNELS:
        return None
    value = spec.param_dict().get("model_id")
    if not value:
        return None
    validate_spec(spec)  # the kernel's rules: 64 lower-case hex digits, only the data inputs
    return bytes.fromhex(str(value))


def make_model_spec(model: bytes, params: Mapping[str, Any], x: np.ndarray | None, *,
                    kernel: str = "keras_infer", **limits: Any) -> JobSpec:
    """A by-model spec of ``kernel`` naming ``model`` (its id) with batch ``x``; ``limits`` as :func:`make_spec` takes.

    A ``stream_infer`` session's spec has no ``x`` (pass None): its items are not inputs of the spec.
    """
    if len(model) != 32:
        raise InvalidParams(f"a model id is 32 bytes, got {len(model)}")
    if kernel not in BY_MODEL_KERNELS:
        raise InvalidParams(f"kernel {kernel} cannot name a model by id (only {', '.join(sorted(BY_MODEL_KERNELS))})")
    return make_spec(kernel, 1, {**params, "model_id": model.hex()}, {} if x is None else {"x": x}, **limits)


def expand_model_spec(spec: JobSpec, bundle: ModelBundle,
                      inputs: Mapping[str, np.ndarray]) -> tuple[JobSpec, dict[str, np.ndarray]]:
    """The spec and inputs a provider runs for a by-model ``spec`` whose model is ``bundle``.

    Raises :class:`InputMismatch` if the bundle is not the model the spec names (its hash differs).
    """
    wanted = spec_model_id(spec)
    if wanted is None:
        raise InvalidParams(f"spec of {spec.kernel} names no model")
    if model_id(bundle) != wanted:
        raise InputMismatch(f"bundle {model_id(bundle).hex()[:16]} is not the model {wanted.hex()[:16]} "
                            f"the spec names")
    params = {k: v for k, v in spec.params if k != "model_id"}
    full = {**bundle_to_inputs(bundle), **inputs}
    expanded = make_spec(spec.kernel, spec.version, params, full, device=spec.requirements.device,
                         memory_bytes=spec.requirements.memory_bytes, seconds=spec.limits.seconds,
                         output_bytes=spec.limits.output_bytes)
    return expanded, full
