"""Reserve through a gRPC channel balanced over every replica, as a caller
should configure one: the target names all replicas through DNS (in
Kubernetes the headless Service, dns:///stockgate-api-headless.NS.svc.cluster.local:50051),
and round_robin spreads calls over a connection to each. Replicas send
GOAWAY once a connection is older than server.max_connection_age_ms; the
channel then resolves the name again and connects to replicas added since.

Usage: balanced.py TARGET SKU SECONDS
Prints one line per call: the wall-clock time it was answered (seconds
since the epoch) and its answer (OK:<outcome> or the status code's name).
"""

import sys
import time
import uuid

import grpc

from stockgate.v1 import inventory_pb2, inventory_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.lb_policy_name", "round_robin"),
    # grpc-core waits at least this long between two resolutions (30 s by
    # default). Keep it below the server's connection age, or a GOAWAY
    # finds the resolver still holding the old list of replicas.
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
]


def main() -> int:
    target, sku, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = inventory_pb2_grpc.InventoryServiceStub(channel)
    run = uuid.uuid4().hex[:8]
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        n += 1
        metadata = [("x-user-id", f"bal-{run}-{n}"), ("idempotency-key", f"k-{n}")]
        try:
            answer = stub.Reserve(
                inventory_pb2.ReserveRequest(sku=sku, quantity=1),
                metadata=metadata,
                timeout=2,
            )
            said = "OK:" + inventory_pb2.ReserveOutcome.Name(answer.outcome)
        except grpc.RpcError as err:
            said = err.code().name
        print(f"{time.time():.3f} {said}", flush=True)
        time.sleep(0.02)
    return 0


if __name__ == "__main__":
    sys.exit(main())
