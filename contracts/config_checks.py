"""Field checks the frozen configs' __post_init__ share: a bad value raises ValueError naming the field."""
from __future__ import annotations


def require_at_least(config: object, minimum: int, *names: str) -> None:
    """Each named field of `config` is >= minimum."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def require_positive(config: object, *names: str) -> None:
    """Each named field of `config` is > 0 (durations, where any fraction of a second is fine)."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
