"""The inference errors, all under :class:`syncfw.errors.InferenceError` (defined there, in the one tree).

Every one of them means: no result op was written, and the model that was
serving before the call (or before the load) is still serving::

    InferenceError
    ├── ModelLoadError            unreadable, corrupt or truncated .onnx; session creation failed
    ├── ProviderError             the requested execution provider is not available or ONNX
    │                             Runtime fell back from it while fallback was forbidden
    ├── SignatureError (ValueError)
    │   ├── InputSignatureError   wrong input names, shapes or dtypes
    │   ├── NonFiniteInputError   NaN or infinity in an input
    │   └── OutputSignatureError  the model's outputs do not match its declared signature
    ├── InferenceTimeoutError (TimeoutError)   the per-call watchdog fired
    ├── InferenceRunError         the runtime, or a pre/post function, raised during the call
    └── EngineStateError          no model loaded yet, or the engine is closed
"""

from __future__ import annotations

from syncfw.errors import (
    EngineStateError,
    InferenceError,
    InferenceRunError,
    InferenceTimeoutError,
    InputSignatureError,
    ModelLoadError,
    NonFiniteInputError,
    OutputSignatureError,
    ProviderError,
    SignatureError,
    WorkerDied,
)

__all__ = [
    "EngineStateError",
    "InferenceError",
    "InferenceRunError",
    "InferenceTimeoutError",
    "InputSignatureError",
    "ModelLoadError",
    "NonFiniteInputError",
    "OutputSignatureError",
    "ProviderError",
    "SignatureError",
    "WorkerDied",
]
