"""The broker deployment (redis-server, workers, API nodes) of diffusiond.testing."""

from diffusiond.testing.deployment import (
    TEST_BROKER_ENV,
    Deployment,
    RedisServer,
    deploy,
    start_redis,
    start_worker,
)

__all__ = ["TEST_BROKER_ENV", "Deployment", "RedisServer", "deploy", "start_redis", "start_worker"]
