"""Reserve, watch, extend, confirm, a sale window, a fair opening's draw
and a cart, through the generated Python stubs.

Usage: roundtrip.py HOST:PORT SKU [ADMIN_TOKEN]
Prints one JSON object; exits non-zero on any unexpected answer.
"""

import json
import sys
import threading
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stockgate.v1 import admin_pb2, admin_pb2_grpc, inventory_pb2, inventory_pb2_grpc


def error_info(err):
    """The google.rpc.ErrorInfo among an error's standard details."""
    info = error_details_pb2.ErrorInfo()
    for detail in rpc_status.from_call(err).details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
    return info


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
            info = error_info(err)
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

    # A fair opening: three buyers of one unit call during a draw; each
    # call waits for the close, one is admitted, and the draw reads back.
    drawn = f"{sku}-D"
    admin.SetStock(admin_pb2.SetStockRequest(sku=drawn, stock=1), metadata=admin_metadata)
    opens_ms = int(time.time() * 1000) + 1000
    request = admin_pb2.SetSaleWindowRequest(
        sku=drawn, reason="python roundtrip", draw_window_ms=600
    )
    request.opens_at.FromMilliseconds(opens_ms)
    admin.SetSaleWindow(request, metadata=admin_metadata)
    answers = {}

    def buyer(n):
        time.sleep(max(0.0, (opens_ms + 50) / 1000 - time.time()))
        answer = inventory.Reserve(
            inventory_pb2.ReserveRequest(sku=drawn, quantity=1),
            metadata=[("x-user-id", f"{user}-draw-{n}")],
            timeout=30,
        )
        outcome = inventory_pb2.ReserveOutcome.Name(answer.outcome)
        answers[n] = ("ADMITTED" if answer.outcome in admitted else outcome, time.time() * 1000)

    buyers = [threading.Thread(target=buyer, args=(n,)) for n in range(3)]
    for thread in buyers:
        thread.start()
    for thread in buyers:
        thread.join()
    draw = admin.GetDraw(admin_pb2.GetDrawRequest(sku=drawn), metadata=admin_metadata)
    try:
        admin.GetDraw(admin_pb2.GetDrawRequest(sku=windowed), metadata=admin_metadata)
        raise SystemExit("a SKU without a draw had one")
    except grpc.RpcError as err:
        no_draw = {"code": err.code().name, "reason": error_info(err).reason}

    # A sale: the cap binds across its SKUs (the server under test decides
    # in the request path), and a SKU of another sale is refused by reason.
    sale_skus = [f"{sku}-S1", f"{sku}-S2"]
    for member in sale_skus:
        admin.SetStock(admin_pb2.SetStockRequest(sku=member, stock=5), metadata=admin_metadata)
    sale = admin.SetSale(
        admin_pb2.SetSaleRequest(
            sale_id=f"{sku}-SALE", max_per_user=1, skus=sale_skus, reason="python roundtrip"
        ),
        metadata=admin_metadata,
    ).sale
    first_in_sale = inventory.Reserve(
        inventory_pb2.ReserveRequest(sku=sale_skus[0], quantity=1), metadata=caller
    )
    second_in_sale = inventory.Reserve(
        inventory_pb2.ReserveRequest(sku=sale_skus[1], quantity=1), metadata=caller
    )
    # Through the queue the refusal comes as the reservation's end state.
    second_state = None
    if second_in_sale.outcome == inventory_pb2.RESERVE_OUTCOME_QUEUED:
        for update in inventory.WatchReservation(
            inventory_pb2.WatchReservationRequest(
                reservation_id=second_in_sale.reservation.reservation_id
            ),
            metadata=caller,
            timeout=30,
        ):
            if update.reservation.state != inventory_pb2.RESERVATION_STATE_QUEUED:
                second_state = update.reservation
                break
    try:
        admin.SetSale(
            admin_pb2.SetSaleRequest(
                sale_id=f"{sku}-OTHER", skus=sale_skus[:1], reason="python roundtrip"
            ),
            metadata=admin_metadata,
        )
        raise SystemExit("a SKU of another sale was taken")
    except grpc.RpcError as err:
        in_other_sale = {"code": err.code().name, "reason": error_info(err).reason}
    got_sale = admin.GetSale(
        admin_pb2.GetSaleRequest(sale_id=f"{sku}-SALE"), metadata=admin_metadata
    ).sale

    # A cart: two SKUs held under one id, or, with one line sold out,
    # nothing held and the failed line named; a bad cart names `lines`.
    cart_skus = [f"{sku}-C1", f"{sku}-C2"]
    for member, units in zip(cart_skus, (4, 1)):
        admin.SetStock(admin_pb2.SetStockRequest(sku=member, stock=units), metadata=admin_metadata)

    def cart(lines, who):
        request = inventory_pb2.ReserveCartRequest(
            lines=[inventory_pb2.ReservationLine(sku=s, quantity=q) for s, q in lines]
        )
        return inventory.ReserveCart(request, metadata=[("x-user-id", who)])

    held_cart = cart([(cart_skus[0], 2), (cart_skus[1], 1)], user)
    refused_cart = cart([(cart_skus[0], 2), (cart_skus[1], 1)], f"{user}-2")
    # QUEUED with the order queue on: read until the processor decides it.
    for _ in range(200):
        read_cart = inventory.GetReservation(
            inventory_pb2.GetReservationRequest(
                reservation_id=held_cart.reservation.reservation_id
            ),
            metadata=caller,
        ).reservation
        if read_cart.state != inventory_pb2.RESERVATION_STATE_QUEUED:
            break
        time.sleep(0.025)
    released_cart = inventory.ReleaseReservation(
        inventory_pb2.ReleaseReservationRequest(
            reservation_id=held_cart.reservation.reservation_id
        ),
        metadata=caller,
    ).reservation
    try:
        cart([(cart_skus[0], 1), (cart_skus[0], 1)], user)
        raise SystemExit("a cart with a SKU twice was taken")
    except grpc.RpcError as err:
        bad_cart = {"code": err.code().name, "field": error_info(err).metadata["field"]}

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
                "draw_outcomes": sorted(outcome for outcome, _ in answers.values()),
                "draw_heard_after_close": all(
                    at >= opens_ms + 600 for _, at in answers.values()
                ),
                "draw": {
                    "entrant_count": draw.entrant_count,
                    "seed_digits": len(draw.seed),
                    "drawn": draw.HasField("drawn_at"),
                    "outcomes": sorted(
                        admin_pb2.DrawOutcome.Name(e.outcome) for e in draw.entrants
                    ),
                },
                "no_draw": no_draw,
                "confirmed_units": stock.confirmed_units,
                "db_stock": stock.db_stock,
                "window_now": now,
                "not_open": not_open,
                "closed": closed,
                "backwards_window": backwards,
                "sale": {"skus": list(sale.skus), "max_per_user": sale.max_per_user},
                "sale_read_back": list(got_sale.skus),
                "sale_outcomes": [
                    inventory_pb2.ReserveOutcome.Name(first_in_sale.outcome),
                    inventory_pb2.ReserveOutcome.Name(second_in_sale.outcome),
                ],
                "sale_second_state": None
                if second_state is None
                else {
                    "state": inventory_pb2.ReservationState.Name(second_state.state),
                    "reason": second_state.reject_reason,
                },
                "sale_of_member": admin.GetStock(
                    admin_pb2.GetStockRequest(sku=sale_skus[0]), metadata=admin_metadata
                ).stock.sale_id,
                "in_other_sale": in_other_sale,
                "cart": {
                    "outcome": inventory_pb2.CartOutcome.Name(held_cart.outcome),
                    "queue_position": held_cart.HasField("queue_position"),
                    "state": inventory_pb2.ReservationState.Name(read_cart.state),
                    "lines": [[l.sku, l.quantity] for l in read_cart.lines],
                    "refused": inventory_pb2.CartOutcome.Name(refused_cart.outcome),
                    "line_results": [
                        [r.sku, inventory_pb2.ReserveOutcome.Name(r.outcome)]
                        for r in refused_cart.line_results
                    ],
                    "released": inventory_pb2.ReservationState.Name(released_cart.state),
                    "db_stock": [
                        admin.GetStock(
                            admin_pb2.GetStockRequest(sku=member), metadata=admin_metadata
                        ).stock.db_stock
                        for member in cart_skus
                    ],
                    "bad": bad_cart,
                },
                "windowed_db_stock": admin.GetStock(
                    admin_pb2.GetStockRequest(sku=windowed), metadata=admin_metadata
                ).stock.db_stock,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
