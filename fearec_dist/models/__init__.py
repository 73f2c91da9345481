"""Models as plain ``nn.Module``s (no Ray, no data/ imports) and the registry that builds them.

``build_model(name, n_items=…, max_seq_len=…, **overrides)``; ``get_spec(name)`` gives the model's
``loss_terms`` and ``full_scores``; ``validate_model_section`` checks a config's model keys.
"""

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
    "build_config",
    "build_model",
    "get_spec",
    "model_names",
    "validate_model_section",
]
