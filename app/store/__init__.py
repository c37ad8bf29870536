"""Result stores: the contract (base.py) and one module per backend (redis.py, s3.py).

from app.store import open_store
store = open_store(settings)       # the backend the result URL names
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.store.base import BatchResult, Done, Journal, Store, StoreUnavailable, bit_is_set

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "BatchResult",
    "Done",
    "Journal",
    "Store",
    "StoreUnavailable",
    "bit_is_set",
    "open_store",
]


def open_store(settings: Settings) -> Store:
    """The result store a settings' result URL names (redis://, rediss:// or s3://)."""
    # Each backend imports its client library (redis-py, boto3) only when chosen.
    if settings.result_url.startswith("s3://"):
        from app.store.s3 import S3Store

        return S3Store(settings.result_url, settings.result_ttl, settings.lease_seconds)
    from app.store.redis import RedisStore

    return RedisStore(settings.result_url, settings.result_ttl, settings.tls_ca_file)
