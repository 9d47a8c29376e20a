"""The kernel error tree.

Every failure a caller can see is a :class:`KernelError`, split by who is at
fault, in the spirit of h11's Local/Remote split:

``KernelError``
  ``SpecError`` (also ``ValueError``) -- the job is bad; re-running cannot help.
  Raised in the caller's process before any TensorFlow work where possible.
    ``MalformedSpec``        -- the spec record itself is not well formed
    ``UnknownKernel``        -- no kernel with that (name, version)
    ``InvalidParams``        -- a param missing, unknown, mistyped or out of range
    ``InputMismatch``        -- inputs missing or extra, or not what the kernel needs
      ``DtypeMismatch``      -- a tensor's dtype differs from its declaration
      ``ShapeMismatch``      -- a tensor's shape differs from its declaration
      ``BlobHashMismatch``   -- an input's bytes do not hash to its blob ref
    ``TensorError``          -- a tensor cannot be (de)serialised
      ``DisallowedDtype``    -- dtype not on the allowlist
      ``TensorTooLarge``     -- element count or byte size over the limit
      ``TruncatedTensor``    -- fewer (or more) bytes than dtype x shape needs
    ``ModelError``           -- a model is not acceptable
      ``MalformedModelConfig`` -- not a Keras JSON model config we understand
      ``DisallowedLayer``    -- a layer, activation or object not on the allowlist
      ``ModelWeightsMismatch`` -- weight tensors do not fit the model
        ``TooManyTensors``   -- more weight tensors than the bundle limit
      ``UnknownModelFormat`` -- a model file that is none of .keras, legacy H5 or .npz inputs
      ``ModelArchiveError``  -- a model archive (zip or HDF5 container) we will not read
        ``TruncatedArchive`` -- cut short or corrupt (bad zip directory, CRC, HDF5 structure)
        ``ArchiveTooLarge``  -- zip bomb: declared or actual sizes over the limit
        ``ArchiveSizeMismatch`` -- a member's bytes differ in length from its header
        ``UnsafeArchiveMember`` -- a member name escapes the archive, repeats, or is unexpected
    ``UnsatisfiableRequirements`` -- this runtime cannot meet the spec's requirements
  ``ExecutionError`` -- the job ran (or tried to) and did not finish well.
    ``JobTimeout``           -- ran past ``limits.seconds``; the worker was killed
    ``WorkerCrashed``        -- the worker process died mid-job
    ``OutOfMemory``          -- the job blew its memory budget
    ``OutputTooLarge``       -- outputs exceed ``limits.output_bytes``
    ``KernelFailed``         -- the kernel raised something unexpected
  ``RuntimeClosed``          -- the runtime (or stream session) is closed

Errors raised inside a worker travel by class name and are re-raised in the
caller as the same class (see :func:`error_from_wire`).
"""

from __future__ import annotations

__all__ = [
    "BlobHashMismatch",
    "DisallowedDtype",
    "DisallowedLayer",
    "DtypeMismatch",
    "ExecutionError",
    "InputMismatch",
    "InvalidParams",
    "JobTimeout",
    "KernelError",
    "KernelFailed",
    "MalformedModelConfig",
    "MalformedSpec",
    "ModelError",
    "ModelWeightsMismatch",
    "ModelArchiveError",
    "ArchiveSizeMismatch",
    "ArchiveTooLarge",
    "TooManyTensors",
    "TruncatedArchive",
    "UnknownModelFormat",
    "UnsafeArchiveMember",
    "OutOfMemory",
    "OutputTooLarge",
    "RuntimeClosed",
    "ShapeMismatch",
    "SpecError",
    "TensorError",
    "TensorTooLarge",
    "TruncatedTensor",
    "UnknownKernel",
    "UnsatisfiableRequirements",
    "WorkerCrashed",
    "error_from_wire",
]


class KernelError(Exception):
    """Base of every error this package raises on purpose."""


class SpecError(KernelError, ValueError):
    """The job itself is wrong (spec, params, inputs or model)."""


class MalformedSpec(SpecError):
    pass


class UnknownKernel(SpecError):
    pass


class InvalidParams(SpecError):
    pass


class InputMismatch(SpecError):
    pass


class DtypeMismatch(InputMismatch):
    pass


class ShapeMismatch(InputMismatch):
    pass


class BlobHashMismatch(InputMismatch):
    pass


class TensorError(SpecError):
    pass


class DisallowedDtype(TensorError):
    pass


class TensorTooLarge(TensorError):
    pass


class TruncatedTensor(TensorError):
    pass


class ModelError(SpecError):
    pass


class MalformedModelConfig(ModelError):
    pass


class DisallowedLayer(ModelError):
    pass


class ModelWeightsMismatch(ModelError):
    pass


class TooManyTensors(ModelWeightsMismatch):
    pass


class UnknownModelFormat(ModelError):
    pass


class ModelArchiveError(ModelError):
    """The container of a model file, not the model in it, is unacceptable."""


class TruncatedArchive(ModelArchiveError):
    pass


class ArchiveTooLarge(ModelArchiveError):
    pass


class ArchiveSizeMismatch(ModelArchiveError):
    pass


class UnsafeArchiveMember(ModelArchiveError):
    pass


class UnsatisfiableRequirements(SpecError):
    pass


class ExecutionError(KernelError):
    """The job did not complete; the worker that ran it may have been replaced."""


class JobTimeout(ExecutionError):
    pass


class WorkerCrashed(ExecutionError):
    pass


class OutOfMemory(ExecutionError):
    pass


class OutputTooLarge(ExecutionError):
    pass


class KernelFailed(ExecutionError):
    pass


class RuntimeClosed(KernelError):
    pass


def _all_subclasses(cls: type[KernelError]) -> dict[str, type[KernelError]]:
    found: dict[str, type[KernelError]] = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_all_subclasses(sub))
    return found


_BY_NAME = _all_subclasses(KernelError)


def error_from_wire(name: str, message: str) -> KernelError:
    """Rebuild an error a worker reported; unknown names become KernelFailed."""
    cls = _BY_NAME.get(name)
    if cls is None:
        return KernelFailed(f"{name}: {message}")
    return cls(message)
