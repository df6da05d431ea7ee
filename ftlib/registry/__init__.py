"""Layer 4, registry: the gate, registration and promotion in the MLflow model registry, and the
`models:/NAME@alias` URIs every lower layer accepts (registered with ftlib.core.models on import).
May import core, serving and stages."""

from pathlib import Path

from ftlib.core.models import ModelError, set_registry_resolver


def _local_copy(uri: str) -> Path:
    from ftlib.registry.register import RegistryError, local_copy

    try:
        return local_copy(uri)
    except RegistryError as e:
        raise ModelError(str(e)) from None


set_registry_resolver(_local_copy)
