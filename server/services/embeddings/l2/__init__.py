"""Second-level embedding caches behind one small interface (get/put/stats/clear): Redis, shared by
replicas, or a directory on a single host. L1 (l1.py) is the first level, in process."""

from __future__ import annotations

from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.tier import L2Tier, TierUnavailable
from server.settings import Settings

__all__ = ["L2Tier", "TierUnavailable", "build_l2"]


def build_l2(settings: Settings) -> L2Tier | None:
    """The configured tier, or None. Nothing is contacted here: an unreachable Redis only makes misses."""
    breaker = Breaker(settings.cache_l2_retry_s, settings.cache_l2_retry_max_s)
    if settings.cache_redis_url:
        from server.services.embeddings.l2.redis_tier import RedisTier

        return RedisTier(
            settings.cache_redis_url,
            namespace=settings.cache_namespace,
            ttl_s=settings.cache_redis_ttl_s,
            timeout_s=settings.cache_redis_timeout_s,
            breaker=breaker,
        )
    if settings.cache_disk_dir is not None:
        from server.services.embeddings.l2.disk_tier import DiskTier

        return DiskTier(
            settings.cache_disk_dir,
            namespace=settings.cache_namespace,
            max_bytes=settings.cache_disk_bytes,
            breaker=breaker,
        )
    return None
