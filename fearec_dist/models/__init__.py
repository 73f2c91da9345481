"""Models as plain ``nn.Module``s (no Ray, no data/ imports) and the registry that builds them.

``build_model(name, n_items=…, max_seq_len=…, **overrides)`` builds a model or preset;
``get_spec(name)`` gives its ``loss_terms`` and ``full_scores``; ``validate_model_section`` checks
a config's model keys; ``load_recbole`` imports a RecBole 1.2.x FEARec/SASRec checkpoint without
executing its pickled objects.
"""

from fearec_dist.models.recbole_import import RecBoleImportError, load_recbole
from fearec_dist.models.registry import (
    ModelSpec,
    build_config,
    build_model,
    get_spec,
    model_names,
    validate_model_section,
)

__all__ = [
    "ModelSpec",
    "RecBoleImportError",
    "build_config",
    "build_model",
    "get_spec",
    "load_recbole",
    "model_names",
    "validate_model_section",
]
