"""The data layer's error type (defined in the leaf module ``fearec_dist.errors``)."""

from fearec_dist.errors import DataError

__all__ = ["DataError"]
