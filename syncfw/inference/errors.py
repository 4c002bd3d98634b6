"""The inference errors, all under :class:`syncfw.errors.InferenceError`.

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

from syncfw.errors import InferenceError

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
]


class ModelLoadError(InferenceError):
    """The model could not be loaded; the previously loaded model (if any) keeps serving."""


class ProviderError(InferenceError):
    """The requested execution provider is unavailable, or ONNX Runtime fell back from it."""


class SignatureError(InferenceError, ValueError):
    """Tensors that do not match the model's declared signature."""


class InputSignatureError(SignatureError):
    """An input with a wrong name, shape or dtype (checked before running)."""


class NonFiniteInputError(SignatureError):
    """An input holding NaN or infinity."""


class OutputSignatureError(SignatureError):
    """The model produced outputs that do not match its declared output signature."""


class InferenceTimeoutError(InferenceError, TimeoutError):
    """The call ran past the watchdog timeout. Its worker thread was abandoned."""


class InferenceRunError(InferenceError):
    """The runtime, or a user pre/post function, raised during the call."""


class EngineStateError(InferenceError):
    """No model is loaded yet, or the engine has been closed."""
