"""TensorFlow job kernels: specs, registry, runtime, verification.

Importing this package, building a spec and validating it never imports
TensorFlow; only worker processes (``kernels.runtime``) and kernel ``run`` /
Keras ``verify`` calls do. Nodes without the provider role start fast.
"""

from kernels.errors import (
    BlobHashMismatch,
    DisallowedDtype,
    DisallowedLayer,
    DtypeMismatch,
    ExecutionError,
    InputMismatch,
    InvalidParams,
    JobTimeout,
    KernelError,
    KernelFailed,
    MalformedModelConfig,
    MalformedSpec,
    ModelError,
    ModelWeightsMismatch,
    OutOfMemory,
    OutputTooLarge,
    RuntimeClosed,
    ShapeMismatch,
    SpecError,
    TensorError,
    TensorTooLarge,
    TruncatedTensor,
    UnknownKernel,
    UnsatisfiableRequirements,
    WorkerCrashed,
)
from kernels.kernel import Verdict
from kernels.models import check_model_config
from kernels.probe import Capabilities, default_slots, detect_gpus
from kernels.registry import KERNELS, lookup
from kernels.runtime import JobResult, JobStats, KernelRuntime, RuntimeConfig, StreamSession
from kernels.spec import (
    BlobRef,
    JobSpec,
    Limits,
    Requirements,
    blob_ref,
    decode_blob,
    decode_spec,
    make_spec,
    spec_hash,
    validate_inputs,
    validate_spec,
)
from kernels.tensors import DTYPES, Tensor, blob_hash, decode_tensor, encode_tensor

__all__ = [
    "DTYPES", "KERNELS", "BlobHashMismatch", "BlobRef", "Capabilities", "DisallowedDtype", "DisallowedLayer",
    "DtypeMismatch", "ExecutionError", "InputMismatch", "InvalidParams", "JobResult", "JobSpec", "JobStats",
    "JobTimeout", "KernelError", "KernelFailed", "KernelRuntime", "Limits", "MalformedModelConfig", "MalformedSpec",
    "ModelError", "ModelWeightsMismatch", "OutOfMemory", "OutputTooLarge", "Requirements", "RuntimeClosed",
    "RuntimeConfig", "ShapeMismatch", "SpecError", "StreamSession", "Tensor", "TensorError", "TensorTooLarge",
    "TruncatedTensor", "UnknownKernel", "UnsatisfiableRequirements", "Verdict", "WorkerCrashed", "blob_hash",
    "blob_ref", "check_model_config", "decode_blob", "decode_spec", "decode_tensor", "default_slots", "detect_gpus",
    "encode_tensor", "lookup",
    "make_spec", "spec_hash", "validate_inputs", "validate_spec",
]
