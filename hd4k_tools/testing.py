"""Public home of the tiny random checkpoint (documented as ``hd4k_tools.testing``).

The implementation lives in the model family folder (:mod:`hd4k_tools.models.xcomposer2_4khd.tiny`);
this module re-exports its public names.
"""

from hd4k_tools.models.xcomposer2_4khd.tiny import (
    TINY_VOCAB_SIZE,
    make_tiny_checkpoint,
    random_model,
    tiny_config_dict,
    write_weights,
)

__all__ = ["TINY_VOCAB_SIZE", "make_tiny_checkpoint", "random_model", "tiny_config_dict", "write_weights"]
