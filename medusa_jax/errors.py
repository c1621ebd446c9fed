"""Typed errors of medusa_jax.

Every error a caller can cause is a subclass of :class:`MedusaError`, itself a
``ValueError``, and its message names the field, tensor, file or request at
fault together with what was expected and what came.
"""

from __future__ import annotations


class MedusaError(ValueError):
  """Base class of every error medusa_jax raises on bad input."""


class ConfigError(MedusaError):
  """A Medusa ``config.json`` (or dict) is missing a field or has a bad value."""


class UnsupportedModelError(ConfigError):
  """A base model's ``config.json`` asks for an architecture or a field value that is not
  implemented (an unknown ``model_type``, a RoPE type, a bias, an unknown field): refused
  rather than run with different math."""


class ModelNotFoundError(MedusaError):
  """A model or adapter is neither a local directory nor in the Hugging Face cache."""


class AdapterMismatchError(MedusaError):
  """An adapter does not fit its base model (hidden size, vocabulary, dtype)."""


class ArchitectureError(MedusaError):
  """The requested head architecture cannot be built (e.g. V2 with L > 1)."""


class WeightsError(MedusaError):
  """Base class of adapter weight-file errors."""


class WeightsNotFoundError(WeightsError):
  """No weight file was found where one was expected."""


class MissingTensorError(WeightsError):
  """A tensor the heads need is absent from the weight files."""


class TensorShapeError(WeightsError):
  """A tensor has the wrong shape."""


class TensorDtypeError(WeightsError):
  """A tensor has a dtype the heads cannot use (e.g. an integer tensor)."""


class CorruptWeightsError(WeightsError):
  """A weight file is truncated, corrupt or unreadable."""


class NonFiniteWeightsError(CorruptWeightsError):
  """A tensor holds NaN or infinite values."""


class WeightsFormatError(WeightsError):
  """A weight file has an unsupported format, or needs a package that is not installed."""


class OutputExistsError(MedusaError):
  """A file or directory already exists where one would be written (pass overwrite=True)."""


class WriteError(MedusaError):
  """A file could not be written (disk full, no permission, ...); names the destination."""


class CheckpointExistsError(WeightsError, OutputExistsError):
  """A checkpoint already exists where one would be written (pass overwrite=True)."""


class AmbiguousWeightsError(WeightsError):
  """Two weight files hold the same tensor, or a directory mixes checkpoint formats."""


class NonFiniteOutputError(MedusaError):
  """The model produced NaN or infinite logits for a request (a corrupt or overflowing model)."""


class AdapterLoadError(MedusaError):
  """An adapter violates the static/dynamic adapter loading rules."""


class SegmentError(MedusaError):
  """Bad segment layout or segmented-matmul arguments."""


class RequestError(MedusaError):
  """A generation request is malformed (empty prompt, bad ids, bad options).

  Attributes:
    param: the request field at fault, as the client named it, when known
      (an HTTP answer's ``param``).
  """

  def __init__(self, *args, param: str | None = None):
    super().__init__(*args)
    self.param = param


class NonFiniteLogitsError(RequestError, NonFiniteOutputError):
  """A request's logits became NaN or infinite during decoding; that request failed alone."""


class AdapterNotFoundError(RequestError):
  """A request names an adapter that is neither loaded nor loadable (HTTP 404)."""


class OverloadedError(MedusaError):
  """The server's request queue is full: retry later (HTTP 503)."""


class ShuttingDownError(MedusaError):
  """The server is shutting down and admits no new requests (HTTP 503)."""


class ShardingError(MedusaError):
  """A size does not divide the mesh axis it is sharded over."""


class AssetError(MedusaError):
  """A model or data package could not be fetched, verified or converted."""


class DataFormatError(MedusaError):
  """A data file is not in its expected format (e.g. ShareGPT without a top-level array)."""


class TrainingDataError(MedusaError):
  """Training data is malformed, or overlaps the evaluation questions."""
