"""medusa_jax: Medusa speculative decoding in JAX for GPU and TPU."""

from medusa_jax.config import MedusaConfig
from medusa_jax.errors import (AdapterLoadError, ArchitectureError, AssetError, ConfigError,
                               CorruptWeightsError, MedusaError, MissingTensorError,
                               RequestError, SegmentError, ShardingError, TensorShapeError,
                               WeightsError, WeightsNotFoundError)
from medusa_jax.heads import (MedusaHead, MedusaModel, MedusaV1, MedusaV2, ResBlock,
                              speculation_max_batch_size)

__version__ = "0.1.0"
