"""Reserve, watch, extend, confirm, and a sale window, through the
generated Python stubs.

Usage: roundtrip.py HOST:PORT SKU [ADMIN_TOKEN]
Prints one JSON object; exits non-zero on any unexpected answer.
"""

import json
import sys
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stockgate.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc


def main() -> int:
    target, sku = sys.argv[1], sys.argv[2]
    token = sys.argv[3] if len(sys.argv) > 3 else None
    channel = grpc.insecure_channel(target)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    inventory = inventory_pb2_grpc.InventoryServiceStub(channel)

    admin_metadata = [("x-operator", "python-roundtrip")]
    if token:
        admin_metadata.append(("authorization", f"Bearer {token}"))
    admin.SetStock(admin_pb2.SetStockRequest(sku=sku, stock=3), metadata=admin_metadata)

    user = f"py-{uuid.uuid4().hex[:8]}"
    key = f"{user}-checkout-1"
    metadata = [("x-user-id", user), ("idempotency-key", key)]
    first = inventory.Reserve(inventory_pb2.ReserveRequest(sku=sku, quantity=1), metadata=metadata)
    again = inventory.Reserve(inventory_pb2.ReserveRequest(sku=sku, quantity=1), metadata=metadata)
    admitted = (inventory_pb2.RESERVE_OUTCOME_RESERVED, inventory_pb2.RESERVE_OUTCOME_QUEUED)
    if first.outcome not in admitted:
        raise SystemExit(f"not admitted: {first}")
    reservation_id = first.reservation.reservation_id
    if again.reservation.reservation_id != reservation_id:
        raise SystemExit("the same idempotency key made a second reservation")

    caller = [("x-user-id", user)]
    state = None
    for update in inventory.WatchReservation(
        inventory_pb2.WatchReservationRequest(reservation_id=reservation_id),
        metadata=caller,
        timeout=30,
    ):
        state = update.reservation.state
        if state != inventory_pb2.RESERVATION_STATE_QUEUED:
            break
    if state != inventory_pb2.RESERVATION_STATE_HELD:
        raise SystemExit(f"expected HELD, got {inventory_pb2.ReservationState.Name(state)}")

    # More time for the hold: later, never twice, never past the limit.
    def extend(seconds):
        request = inventory_pb2.ExtendReservationRequest(
            reservation_id=reservation_id, hold_seconds=seconds
        )
        return inventory.ExtendReservation(request, metadata=caller).reservation

    def refusal(seconds):
        try:
            extend(seconds)
        except grpc.RpcError as err:
            status = rpc_status.from_call(err)
            info = error_details_pb2.ErrorInfo()
            for detail in status.details:
                if detail.Is(info.DESCRIPTOR):
                    detail.Unpack(info)
            return {
                "code": err.code().name,
                "reason": info.reason,
                "metadata": dict(info.metadata),
                "details": err.details(),
            }
        raise SystemExit(f"hold_seconds={seconds} was accepted")

    held = inventory.GetReservation(
        inventory_pb2.GetReservationRequest(reservation_id=reservation_id), metadata=caller
    ).reservation
    extended = extend(1200)
    shorter = extend(60)
    past_limit = refusal(1800)
    too_long = refusal(10**6)
    after_refusals = inventory.GetReservation(
        inventory_pb2.GetReservationRequest(reservation_id=reservation_id), metadata=caller
    ).reservation

    confirmed = inventory.ConfirmReservation(
        inventory_pb2.ConfirmReservationRequest(reservation_id=reservation_id), metadata=caller
    )

    # Bad input comes back as INVALID_ARGUMENT naming the field.
    try:
        inventory.Reserve(inventory_pb2.ReserveRequest(sku=sku, quantity=0), metadata=caller)
        raise SystemExit("quantity 0 was accepted")
    except grpc.RpcError as err:
        invalid = {"code": err.code().name, "details": err.details()}

    # A sale window: NOT_OPEN with the opening before it, CLOSED with the
    # closing after it; a closing before the opening names the field.
    windowed = f"{sku}-W"
    admin.SetStock(admin_pb2.SetStockRequest(sku=windowed, stock=5), metadata=admin_metadata)
    now = int(time.time())

    def window(opens, closes):
        request = admin_pb2.SetSaleWindowRequest(sku=windowed, reason="python roundtrip")
        request.opens_at.FromSeconds(opens)
        request.closes_at.FromSeconds(closes)
        admin.SetSaleWindow(request, metadata=admin_metadata)
        answer = inventory.Reserve(
            inventory_pb2.ReserveRequest(sku=windowed, quantity=1), metadata=caller
        )
        return {
            "outcome": inventory_pb2.ReserveOutcome.Name(answer.outcome),
            "opens_at": answer.opens_at.ToJsonString() if answer.HasField("opens_at") else None,
            "closes_at": answer.closes_at.ToJsonString() if answer.HasField("closes_at") else None,
            "has_reservation": answer.HasField("reservation"),
        }

    not_open = window(now + 3600, now + 7200)
    closed = window(now - 7200, now - 3600)
    try:
        window(now + 60, now + 30)
        raise SystemExit("a closing before the opening was accepted")
    except grpc.RpcError as err:
        backwards = {"code": err.code().name, "details": err.details()}

    stock = admin.GetStock(admin_pb2.GetStockRequest(sku=sku), metadata=admin_metadata).stock
    print(
        json.dumps(
            {
                "reservation_id": reservation_id,
                "first_outcome": inventory_pb2.ReserveOutcome.Name(first.outcome),
                "same_key_same_reservation": again.reservation.reservation_id == reservation_id,
                "watched_state": inventory_pb2.ReservationState.Name(state),
                "confirmed_state": inventory_pb2.ReservationState.Name(confirmed.reservation.state),
                "held_expires_at": held.expires_at.ToJsonString(),
                "extended_expires_at": extended.expires_at.ToJsonString(),
                "extended_state": inventory_pb2.ReservationState.Name(extended.state),
                "shorter_expires_at": shorter.expires_at.ToJsonString(),
                "after_refusals_expires_at": after_refusals.expires_at.ToJsonString(),
                "past_limit": past_limit,
                "too_long": too_long,
                "extend_after_confirm": refusal(60),
                "invalid_quantity": invalid,
                "confirmed_units": stock.confirmed_units,
                "db_stock": stock.db_stock,
                "window_now": now,
                "not_open": not_open,
                "closed": closed,
                "backwards_window": backwards,
                "windowed_db_stock": admin.GetStock(
                    admin_pb2.GetStockRequest(sku=windowed), metadata=admin_metadata
                ).stock.db_stock,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
