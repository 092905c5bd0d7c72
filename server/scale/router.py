"""The worker deployment's request router: Serve's consistent-hash ring (experimental in ray 2.60.0), plus
pins. A request whose session id is `replica=<unique id>` goes to that replica only, waiting while it is full
rather than spilling: it names state that lives in one replica's memory (a tracking state)."""

from __future__ import annotations

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

PIN = "replica="


class PinnedConsistentHashRouter(ConsistentHashRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if session.startswith(PIN):
            wanted = session.removeprefix(PIN)
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == wanted:
                    assert pending_request is not None
                    pending_request.routing_context.should_backoff = True
                    return [[replica]]
            # Gone, its states with it: the ring picks a live replica, which answers that a state is unknown.
        return await super().choose_replicas(candidate_replicas, pending_request)
