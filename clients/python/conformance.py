"""gRPC conformance suite for stockgate, run through grpc-core (grpcio).

Usage:
  conformance.py --target HOST:PORT --not-ready HOST:PORT --token TOKEN
                 --dedup {off,redis} --hold-ttl-secs N [--aborted USER KEY SKU]

`--target` is a ready server (rate limit on with per_user_burst = 2 and a
long period; dedup as `--dedup` says); `--not-ready` one whose stock gate
cannot load (health NOT_SERVING). The suite creates its own SKUs through
AdminService (names unique per run), then runs every case and prints
`PASS name` or `FAIL name: why` (and `SKIP name: why` for cases it cannot
reach), then `conformance: N passed, N failed`. Exit status 1 if any failed.

Each error case checks the status code and the rich error details the
server attaches (`grpc-status-details-bin`, a google.rpc.Status): an
`ErrorInfo` (domain `stockgate.v1`, a stable reason) on every error the
service itself produces, a `BadRequest` naming the field for
INVALID_ARGUMENT, a `RetryInfo` plus `retry-after` metadata for
RESOURCE_EXHAUSTED and UNAVAILABLE. Errors grpc produces itself (a message
that does not decode, or is too large, without an idempotency key) are
checked by code only. Reserve error cases run twice, with and without an
`idempotency-key` (`[key]`, `[no-key]`).

With `--aborted USER KEY SKU` the caller has planted an in-flight dedup
claim for that user, key and request (quantity 1); the suite then expects
ABORTED / DUPLICATE_IN_FLIGHT for it.

Stubs: see README.md (`PYTHONPATH=gen:...`).
"""

import argparse
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

# grpc-core logs refused metadata at ERROR level on stderr; the suite
# reports that itself.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status  # noqa: E402

from stockgate.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    inventory_pb2,
    inventory_pb2_grpc,
)

TIMEOUT = 10.0
DOMAIN = "stockgate.v1"
INVENTORY = "stockgate.v1.InventoryService"
SC = grpc.StatusCode
inv = inventory_pb2
adm = admin_pb2
LONG_USER = "u" * 129


class Fail(Exception):
    pass


class Skip(Exception):
    pass


# ---- calls ---------------------------------------------------------------


@dataclass
class Result:
    """One call's outcome: the response(s), or the error (a grpc.Call)."""

    response: object = None
    error: Optional[grpc.RpcError] = None


def unary(method, request, metadata=(), timeout=TIMEOUT) -> Result:
    try:
        response, _call = method.with_call(request, metadata=list(metadata), timeout=timeout)
        return Result(response=response)
    except grpc.RpcError as err:
        return Result(error=err)


def stream(method, request, metadata=(), stop=None, timeout=TIMEOUT) -> Result:
    """Reads a server stream until it ends, or until `stop(message)` is true.
    The error, if any, arrives while iterating."""
    messages = []
    call = method(request, metadata=list(metadata), timeout=timeout)
    try:
        for message in call:
            messages.append(message)
            if stop is not None and stop(message):
                call.cancel()
                break
        return Result(response=messages)
    except grpc.RpcError as err:
        return Result(response=messages, error=err)


def ok(result: Result, what: str):
    """The response of a call that must succeed (a setup step or an OK case)."""
    if result.error is not None:
        err = result.error
        raise Fail(f"{what}: expected OK, got {err.code().name}: {err.details()!r}")
    return result.response


# ---- rich error details --------------------------------------------------


def details_of(err):
    """(google.rpc.Status or None, problem or None)."""
    try:
        return rpc_status.from_call(err), None
    except ValueError as exc:
        return None, f"grpc-status-details-bin disagrees with the status: {exc}"


def unpack(status, cls):
    found = []
    for detail in status.details if status is not None else ():
        if detail.Is(cls.DESCRIPTOR):
            message = cls()
            detail.Unpack(message)
            found.append(message)
    return found


def metadata_value(err, key):
    for source in (err.trailing_metadata(), err.initial_metadata()):
        for k, v in source or ():
            if k == key:
                return v
    return None


@dataclass
class Expect:
    """An expected error. `reason`: ErrorInfo reason (None: produced by grpc
    itself, no details required); `field`: BadRequest field the message also
    names; `retry`: RetryInfo and `retry-after`; `message`: a check on the
    message, returning a problem or None."""

    code: grpc.StatusCode
    reason: Optional[str] = None
    field: Optional[str] = None
    retry: bool = False
    message: Optional[Callable[[str], Optional[str]]] = None


def problems(result: Result, want: Expect) -> List[str]:
    err = result.error
    if err is None:
        return [f"expected {want.code.name}, got OK"]
    if err.code() != want.code:
        return [f"expected {want.code.name}, got {err.code().name}: {err.details()!r}"]
    found = []
    text = err.details() or ""
    status, bad = details_of(err)
    if bad:
        found.append(bad)
    wants_details = want.reason or want.field or want.retry
    if wants_details and status is None and not bad:
        found.append(f"no grpc-status-details-bin (message {text!r})")
    if want.reason and status is not None:
        infos = unpack(status, error_details_pb2.ErrorInfo)
        if not any(i.domain == DOMAIN and i.reason == want.reason for i in infos):
            seen = [f"{i.domain}/{i.reason}" for i in infos] or "none"
            found.append(f"want ErrorInfo {DOMAIN}/{want.reason}, found {seen}")
    if want.field:
        if status is not None:
            requests = unpack(status, error_details_pb2.BadRequest)
            fields = [v.field for r in requests for v in r.field_violations]
            if not fields or fields[0] != want.field:
                found.append(f"want BadRequest field {want.field!r}, found {fields or 'none'}")
        if want.field not in text:
            found.append(f"message {text!r} does not name {want.field!r}")
    if want.retry:
        if status is not None:
            delays = unpack(status, error_details_pb2.RetryInfo)
            if not any(d.retry_delay.seconds > 0 or d.retry_delay.nanos > 0 for d in delays):
                found.append("no RetryInfo with retry_delay > 0")
        after = metadata_value(err, "retry-after")
        try:
            if after is None or int(after) < 1:
                raise ValueError
        except ValueError:
            found.append(f"retry-after metadata {after!r}, want whole seconds >= 1")
    if want.message:
        complaint = want.message(text)
        if complaint:
            found.append(complaint)
    if found:
        found[0] = f"{want.code.name} as expected, but " + found[0]
    return found


def expect(result: Result, want: Expect, what: str = ""):
    found = problems(result, want)
    if found:
        raise Fail((f"{what}: " if what else "") + "; ".join(found))


def invalid(field):
    return Expect(SC.INVALID_ARGUMENT, reason="INVALID_ARGUMENT", field=field)


def names_the_gate(text):
    if "gate" not in text.lower() or "not migrated" in text:
        return f"message {text!r} does not name the stock gate"
    return None


# ---- the context every case gets -----------------------------------------


class Ctx:
    def __init__(self, args):
        self.args = args
        self.run = secrets.token_hex(3)
        self.users = 0
        self.channel = grpc.insecure_channel(args.target)
        self.inv = inventory_pb2_grpc.InventoryServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.nr_channel = grpc.insecure_channel(args.not_ready)
        self.nr_inv = inventory_pb2_grpc.InventoryServiceStub(self.nr_channel)
        self.nr_admin = admin_pb2_grpc.AdminServiceStub(self.nr_channel)
        self.auth = [("authorization", f"Bearer {args.token}"), ("x-operator", "conformance")]
        self.sku = f"CONF-{self.run}-MAIN"  # plenty of stock
        self.empty_sku = f"CONF-{self.run}-EMPTY"  # stock 0: sold out
        self.unknown_sku = f"CONF-{self.run}-NOSUCH"  # never created
        self.skus = 0

    def user(self):
        """A fresh user id, so no case eats another's rate-limit budget."""
        self.users += 1
        return f"conf-{self.run}-u{self.users}"

    def key(self):
        return f"conf-{self.run}-{uuid.uuid4().hex[:12]}"

    def md(self, user=None, key=None):
        metadata = []
        if user is not None:
            metadata.append(("x-user-id", user))
        if key is not None:
            metadata.append(("idempotency-key", key))
        return metadata

    def new_sku(self, stock, tag="S"):
        self.skus += 1
        sku = f"CONF-{self.run}-{tag}{self.skus}"
        ok(unary(self.admin.SetStock, adm.SetStockRequest(sku=sku, stock=stock), self.auth), "SetStock")
        return sku

    def reserve(self, user, sku=None, quantity=1, key=None, channel_inv=None):
        request = inv.ReserveRequest(sku=self.sku if sku is None else sku, quantity=quantity)
        return unary((channel_inv or self.inv).Reserve, request, self.md(user, key))

    def reserve_admitted(self, user, key=None, sku=None):
        response = ok(self.reserve(user, sku=sku, key=key), "Reserve")
        if response.outcome not in (inv.RESERVE_OUTCOME_RESERVED, inv.RESERVE_OUTCOME_QUEUED):
            raise Fail(f"Reserve: not admitted: {inv.ReserveOutcome.Name(response.outcome)}")
        return response.reservation.reservation_id

    def admin_state(self, rid, sku=None):
        """A reservation's state read through AdminService (no rate limit)."""
        listed = ok(
            unary(self.admin.ListReservations, adm.ListReservationsRequest(sku=sku or self.sku, limit=1000), self.auth),
            "ListReservations",
        )
        for r in listed.reservations:
            if r.reservation_id == rid:
                return r
        return None

    def held(self, user, key=None, sku=None):
        """Reserves one unit and waits (via AdminService, which spends no
        rate-limit budget) until it is HELD; returns its id."""
        rid = self.reserve_admitted(user, key=key, sku=sku)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = self.admin_state(rid, sku)
            if found is not None:
                if found.state == inv.RESERVATION_STATE_HELD:
                    return rid
                raise Fail(f"reservation became {inv.ReservationState.Name(found.state)}, not HELD")
            time.sleep(0.05)
        raise Fail("reservation not HELD within 10 s")

    def raw(self, path, stream_response=False):
        identity = dict(request_serializer=None, response_deserializer=None)
        if stream_response:
            return self.channel.unary_stream(path, **identity)
        return self.channel.unary_unary(path, **identity)


# ---- case registry -------------------------------------------------------

CASES = []


def case(name, when=None):
    def register(fn):
        CASES.append((name, fn, when))
        return fn

    return register


def reserve_case(name, when=None):
    """A Reserve error case, run with and without an idempotency key: the
    function gets `key`, a fresh key or None."""

    def register(fn):
        CASES.append((f"{name}[no-key]", lambda ctx: fn(ctx, None), when))
        CASES.append((f"{name}[key]", lambda ctx: fn(ctx, ctx.key()), when))
        return fn

    return register


def redis_only(args):
    return None if args.dedup == "redis" else "dedup layer off"


def extend_request(reservation_id, hold_seconds=60):
    return inv.ExtendReservationRequest(reservation_id=reservation_id, hold_seconds=hold_seconds)


METHODS = {
    "GetReservation": inv.GetReservationRequest,
    "ConfirmReservation": inv.ConfirmReservationRequest,
    "ReleaseReservation": inv.ReleaseReservationRequest,
    "ExtendReservation": extend_request,
    "WatchReservation": inv.WatchReservationRequest,
}


def by_id(ctx, method, rid, user, stub=None):
    """Calls one of the reservation-id methods (Watch: first message)."""
    stub = stub or ctx.inv
    request = METHODS[method](reservation_id=rid)
    if method == "WatchReservation":
        return stream(stub.WatchReservation, request, ctx.md(user), stop=lambda _m: True)
    return unary(getattr(stub, method), request, ctx.md(user))


# ---- OK flows --------------------------------------------------------------


@case("health/serving")
def _(ctx):
    health = health_pb2_grpc.HealthStub(ctx.channel)
    for service in ("", INVENTORY):
        answer = ok(unary(health.Check, health_pb2.HealthCheckRequest(service=service)), "Check")
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise Fail(f"Check({service!r}): {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")


@case("ok/reserve-watch-confirm")
def _(ctx):
    user = ctx.user()
    rid = ctx.reserve_admitted(user, key=ctx.key())
    watched = ok(
        stream(
            ctx.inv.WatchReservation,
            inv.WatchReservationRequest(reservation_id=rid),
            ctx.md(user),
            stop=lambda m: m.reservation.state != inv.RESERVATION_STATE_QUEUED,
        ),
        "WatchReservation",
    )
    last = watched[-1].reservation.state if watched else None
    if last != inv.RESERVATION_STATE_HELD:
        raise Fail(f"watch ended at {inv.ReservationState.Name(last or 0)}, not HELD")
    confirmed = ok(unary(ctx.inv.ConfirmReservation, inv.ConfirmReservationRequest(reservation_id=rid), ctx.md(user)), "Confirm")
    if confirmed.reservation.state != inv.RESERVATION_STATE_CONFIRMED:
        raise Fail(f"Confirm answered {inv.ReservationState.Name(confirmed.reservation.state)}")


@case("ok/reserve-release")
def _(ctx):
    user = ctx.user()
    rid = ctx.held(user)
    released = ok(unary(ctx.inv.ReleaseReservation, inv.ReleaseReservationRequest(reservation_id=rid), ctx.md(user)), "Release")
    if released.reservation.state != inv.RESERVATION_STATE_RELEASED:
        raise Fail(f"Release answered {inv.ReservationState.Name(released.reservation.state)}")


@case("ok/get-reservation")
def _(ctx):
    user = ctx.user()
    rid = ctx.held(user)
    got = ok(unary(ctx.inv.GetReservation, inv.GetReservationRequest(reservation_id=rid), ctx.md(user)), "Get")
    if got.reservation.reservation_id != rid or got.reservation.user_id != user:
        raise Fail(f"Get answered {got.reservation}")


@reserve_case("ok/sold-out")
def _(ctx, key):
    response = ok(ctx.reserve(ctx.user(), sku=ctx.empty_sku, key=key), "Reserve")
    if response.outcome != inv.RESERVE_OUTCOME_SOLD_OUT or response.HasField("reservation"):
        raise Fail(f"outcome {inv.ReserveOutcome.Name(response.outcome)}, want SOLD_OUT without a reservation")


@case("ok/same-key-same-reservation")
def _(ctx):
    user, key = ctx.user(), ctx.key()
    first = ctx.reserve_admitted(user, key=key)
    again = ok(ctx.reserve(user, key=key), "second Reserve")
    second = again.reservation.reservation_id
    if second == first:
        return
    if ctx.args.dedup == "redis":
        raise Fail(f"same key gave a second reservation {second} (first {first})")
    # Contract, dedup off: a retry after the first was committed may get a
    # new QUEUED reservation that ends REJECTED naming the first.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = ctx.admin_state(second)
        if found is not None and found.state != inv.RESERVATION_STATE_HELD:
            if found.state == inv.RESERVATION_STATE_REJECTED and first in found.reject_reason:
                return
            raise Fail(f"second reservation {second} is {inv.ReservationState.Name(found.state)}: {found.reject_reason!r}")
        time.sleep(0.05)
    raise Fail(f"second reservation {second} did not end REJECTED")


# ---- rate limit ------------------------------------------------------------


@case("rate-limit/reserve-watch-get-confirm-of-one-user-succeeds")
def _(ctx):
    user = ctx.user()
    rid = ctx.reserve_admitted(user)
    watched = ok(
        stream(
            ctx.inv.WatchReservation,
            inv.WatchReservationRequest(reservation_id=rid),
            ctx.md(user),
            stop=lambda m: m.reservation.state != inv.RESERVATION_STATE_QUEUED,
        ),
        "WatchReservation (2nd call)",
    )
    if not watched or watched[-1].reservation.state != inv.RESERVATION_STATE_HELD:
        raise Fail("watch did not reach HELD")
    ok(unary(ctx.inv.GetReservation, inv.GetReservationRequest(reservation_id=rid), ctx.md(user)), "GetReservation (3rd call)")
    ok(unary(ctx.inv.ConfirmReservation, inv.ConfirmReservationRequest(reservation_id=rid), ctx.md(user)), "ConfirmReservation (4th call)")


@reserve_case("rate-limit/third-reserve")
def _(ctx, key):
    user = ctx.user()
    for n in (1, 2):
        ok(ctx.reserve(user, sku=ctx.empty_sku, key=key and f"{key}-{n}"), f"Reserve #{n}")
    third = ctx.reserve(user, sku=ctx.empty_sku, key=key and f"{key}-3")
    expect(third, Expect(SC.RESOURCE_EXHAUSTED, reason="RATE_LIMITED", retry=True), "Reserve #3")


# ---- INVALID_ARGUMENT: Reserve ------------------------------------------------


@reserve_case("invalid/reserve-missing-x-user-id")
def _(ctx, key):
    expect(ctx.reserve(None, key=key), invalid("x-user-id"))


@reserve_case("invalid/reserve-129-char-x-user-id")
def _(ctx, key):
    expect(ctx.reserve(LONG_USER, key=key), invalid("x-user-id"))


@reserve_case("invalid/reserve-empty-sku")
def _(ctx, key):
    expect(ctx.reserve(ctx.user(), sku="", key=key), invalid("sku"))


@reserve_case("invalid/reserve-sku-with-space")
def _(ctx, key):
    expect(ctx.reserve(ctx.user(), sku="a b", key=key), invalid("sku"))


@reserve_case("invalid/reserve-quantity-0")
def _(ctx, key):
    expect(ctx.reserve(ctx.user(), quantity=0, key=key), invalid("quantity"))


@reserve_case("invalid/reserve-quantity-above-max")
def _(ctx, key):
    expect(ctx.reserve(ctx.user(), quantity=10_001, key=key), invalid("quantity"))


@case("invalid/reserve-idempotency-key-with-space")
def _(ctx):
    expect(ctx.reserve(ctx.user(), key="a b"), invalid("idempotency-key"))


@case("invalid/reserve-129-char-idempotency-key")
def _(ctx):
    expect(ctx.reserve(ctx.user(), key="k" * 129), invalid("idempotency-key"))


@case("invalid/idempotency-key-reused-with-another-sku", when=redis_only)
def _(ctx):
    user, key = ctx.user(), ctx.key()
    ok(ctx.reserve(user, sku=ctx.empty_sku, key=key), "first Reserve")
    expect(ctx.reserve(user, sku=ctx.sku, key=key), invalid("idempotency-key"))


def _reservation_id_cases():
    for method in METHODS:

        @case(f"invalid/{method}-missing-x-user-id")
        def _(ctx, method=method):
            expect(by_id(ctx, method, str(uuid.uuid4()), None), invalid("x-user-id"))

        @case(f"invalid/{method}-bad-reservation-id")
        def _(ctx, method=method):
            expect(by_id(ctx, method, "not-a-reservation", ctx.user()), invalid("reservation_id"))

        @case(f"invalid/{method}-uppercase-reservation-id")
        def _(ctx, method=method):
            expect(by_id(ctx, method, str(uuid.uuid4()).upper(), ctx.user()), invalid("reservation_id"))

        @case(f"not-found/{method}-unknown-reservation")
        def _(ctx, method=method):
            expect(by_id(ctx, method, str(uuid.uuid4()), ctx.user()), Expect(SC.NOT_FOUND, reason="RESERVATION_NOT_FOUND"))

        @case(f"permission-denied/{method}-another-user")
        def _(ctx, method=method):
            rid = ctx.held(ctx.user())
            expect(by_id(ctx, method, rid, ctx.user()), Expect(SC.PERMISSION_DENIED, reason="NOT_OWNER"))


_reservation_id_cases()


# ---- ReserveCart ------------------------------------------------------------------


def cart_request(*lines):
    return inv.ReserveCartRequest(lines=[inv.ReservationLine(sku=s, quantity=q) for s, q in lines])


def cart(ctx, user, *lines, key=None):
    return unary(ctx.inv.ReserveCart, cart_request(*lines), ctx.md(user, key))


def names(text):
    return lambda message: None if text in message else f"message {message!r} does not name {text!r}"


@case("ok/cart-held-whole-then-refused-naming-the-line")
def _(ctx):
    one = ctx.new_sku(1, "CART")
    held = ok(cart(ctx, ctx.user(), (ctx.sku, 2), (one, 1)), "ReserveCart")
    if [(l.sku, l.quantity) for l in held.reservation.lines] != [(ctx.sku, 2), (one, 1)]:
        raise Fail(f"first cart: {held}")
    # With the order queue on, QUEUED: the cart, its position set.
    queued = (
        held.outcome == inv.CART_OUTCOME_QUEUED
        and held.reservation.state == inv.RESERVATION_STATE_QUEUED
        and held.HasField("queue_position")
    )
    if held.outcome != inv.CART_OUTCOME_RESERVED and not queued:
        raise Fail(f"first cart: {held}")
    refused = ok(cart(ctx, ctx.user(), (ctx.sku, 2), (one, 1)), "ReserveCart")
    results = [(r.sku, r.outcome) for r in refused.line_results]
    if refused.outcome != inv.CART_OUTCOME_REFUSED or refused.HasField("reservation") or results != [
        (ctx.sku, inv.RESERVE_OUTCOME_RESERVED),
        (one, inv.RESERVE_OUTCOME_SOLD_OUT),
    ]:
        raise Fail(f"second cart: {refused}")


@case("invalid/cart-missing-x-user-id")
def _(ctx):
    expect(cart(ctx, None, (ctx.sku, 1)), invalid("x-user-id"))


@case("invalid/cart-no-lines")
def _(ctx):
    expect(cart(ctx, ctx.user()), invalid("lines"))


@case("invalid/cart-sku-twice")
def _(ctx):
    expect(cart(ctx, ctx.user(), (ctx.sku, 1), (ctx.sku, 1)), invalid("lines"))


@case("invalid/cart-line-quantity-0")
def _(ctx):
    want = invalid("lines")
    want.message = names("lines[1].quantity")
    expect(cart(ctx, ctx.user(), (ctx.sku, 1), (ctx.empty_sku, 0)), want)


@case("invalid/cart-line-sku-with-space")
def _(ctx):
    want = invalid("lines")
    want.message = names("lines[0].sku")
    expect(cart(ctx, ctx.user(), ("a b", 1)), want)


@case("invalid/cart-idempotency-key-with-space")
def _(ctx):
    expect(cart(ctx, ctx.user(), (ctx.sku, 1), key="a b"), invalid("idempotency-key"))


@case("invalid/cart-key-reused-with-other-lines", when=redis_only)
def _(ctx):
    user, key = ctx.user(), ctx.key()
    ok(cart(ctx, user, (ctx.sku, 1), key=key), "first ReserveCart")
    expect(cart(ctx, user, (ctx.sku, 2), key=key), invalid("idempotency-key"))


@case("invalid/reserve-key-reused-for-a-cart", when=redis_only)
def _(ctx):
    user, key = ctx.user(), ctx.key()
    ok(ctx.reserve(user, key=key), "first Reserve")
    expect(cart(ctx, user, (ctx.sku, 1), key=key), invalid("idempotency-key"))


@case("not-found/cart-unknown-sku")
def _(ctx):
    expect(cart(ctx, ctx.user(), (ctx.sku, 1), (ctx.unknown_sku, 1)), Expect(SC.NOT_FOUND, reason="UNKNOWN_SKU"))


@case("out-of-range/cart-70000-byte-message")
def _(ctx):
    body = cart_request(*[(f"S{n}", 1) for n in range(10_000)]).SerializeToString()
    expect(unary(ctx.raw(f"/{INVENTORY}/ReserveCart"), body, ctx.md(ctx.user())), Expect(SC.OUT_OF_RANGE))


@case("internal/cart-undecodable-bytes")
def _(ctx):
    expect(unary(ctx.raw(f"/{INVENTORY}/ReserveCart"), b"\xff\xff\xff", ctx.md(ctx.user())), Expect(SC.INTERNAL))


# ---- NOT_FOUND / FAILED_PRECONDITION -------------------------------------------


@reserve_case("not-found/reserve-unknown-sku")
def _(ctx, key):
    expect(ctx.reserve(ctx.user(), sku=ctx.unknown_sku, key=key), Expect(SC.NOT_FOUND, reason="UNKNOWN_SKU"))


@case("failed-precondition/confirm-after-hold-expired")
def _(ctx):
    user = ctx.user()
    rid = ctx.held(user)
    time.sleep(ctx.args.hold_ttl_secs)
    # The sweeper runs every few hundred ms; a loaded machine may be later.
    deadline = time.monotonic() + TIMEOUT
    found = ctx.admin_state(rid)
    while (found is None or found.state != inv.RESERVATION_STATE_EXPIRED) and time.monotonic() < deadline:
        time.sleep(0.1)
        found = ctx.admin_state(rid)
    if found is None or found.state != inv.RESERVATION_STATE_EXPIRED:
        state = inv.ReservationState.Name(found.state) if found else "missing"
        raise Fail(f"hold not swept: {state} {TIMEOUT:.0f} s after it was due")
    confirm = unary(ctx.inv.ConfirmReservation, inv.ConfirmReservationRequest(reservation_id=rid), ctx.md(user))
    expect(confirm, Expect(SC.FAILED_PRECONDITION, reason="HOLD_EXPIRED"))
    extend = unary(ctx.inv.ExtendReservation, extend_request(rid), ctx.md(user))
    expect(extend, Expect(SC.FAILED_PRECONDITION, reason="HOLD_EXPIRED"), "ExtendReservation")


@case("invalid/extend-zero-seconds")
def _(ctx):
    user = ctx.user()
    rid = ctx.held(user)
    expect(unary(ctx.inv.ExtendReservation, extend_request(rid, 0), ctx.md(user)), invalid("hold_seconds"))


@case("failed-precondition/extend-past-the-hold-limit")
def _(ctx):
    # The test server's reservations.max_hold_secs is 1800 s from when the
    # hold began (a moment ago): 1800 s from now is past it.
    user = ctx.user()
    rid = ctx.held(user)
    refused = unary(ctx.inv.ExtendReservation, extend_request(rid, 1800), ctx.md(user))
    expect(refused, Expect(SC.FAILED_PRECONDITION, reason="HOLD_LIMIT"))
    status, _ = details_of(refused.error)
    info = unpack(status, error_details_pb2.ErrorInfo)
    if not info or "latest_expires_at" not in info[0].metadata:
        raise Fail(f"HOLD_LIMIT without latest_expires_at: {info}")


def end_twice(first, second):
    """A hold ended by `first` (Confirm or Release), then by `second`:
    the second is refused as the wrong state."""

    def run(ctx):
        user = ctx.user()
        rid = ctx.held(user)
        calls = {
            "Confirm": (ctx.inv.ConfirmReservation, inv.ConfirmReservationRequest),
            "Release": (ctx.inv.ReleaseReservation, inv.ReleaseReservationRequest),
            "Extend": (ctx.inv.ExtendReservation, extend_request),
        }
        method, request = calls[first]
        ok(unary(method, request(reservation_id=rid), ctx.md(user)), f"{first} (2nd call)")
        method, request = calls[second]
        refused = unary(method, request(reservation_id=rid), ctx.md(user))
        expect(refused, Expect(SC.FAILED_PRECONDITION, reason="WRONG_STATE"), f"{second} (3rd call)")

    return run


case("failed-precondition/confirm-released")(end_twice("Release", "Confirm"))
case("failed-precondition/release-confirmed")(end_twice("Confirm", "Release"))
case("failed-precondition/extend-released")(end_twice("Release", "Extend"))


@case("failed-precondition/confirm-still-queued")
def _(ctx):
    raise Skip("a QUEUED reservation is processed within milliseconds; not reachable reliably from outside")


# ---- message size, undecodable bytes, deadline --------------------------------

RAW_PATHS = {
    "Reserve": False,
    "GetReservation": False,
    "ConfirmReservation": False,
    "ReleaseReservation": False,
    "ExtendReservation": False,
    "WatchReservation": True,
}


def raw_call(ctx, method, body, metadata):
    path = f"/{INVENTORY}/{method}"
    if RAW_PATHS[method]:
        return stream(ctx.raw(path, stream_response=True), body, metadata)
    return unary(ctx.raw(path), body, metadata)


@reserve_case("out-of-range/reserve-70000-byte-message")
def _(ctx, key):
    body = inv.ReserveRequest(sku="A" * 70_000, quantity=1).SerializeToString()
    expect(raw_call(ctx, "Reserve", body, ctx.md(ctx.user(), key)), Expect(SC.OUT_OF_RANGE))


@reserve_case("internal/reserve-undecodable-bytes")
def _(ctx, key):
    expect(raw_call(ctx, "Reserve", b"\xff\xff\xff", ctx.md(ctx.user(), key)), Expect(SC.INTERNAL))


def _raw_cases():
    for method in list(RAW_PATHS)[1:]:

        @case(f"out-of-range/{method}-70000-byte-message")
        def _(ctx, method=method):
            body = METHODS[method](reservation_id="a" * 70_000).SerializeToString()
            expect(raw_call(ctx, method, body, ctx.md(ctx.user())), Expect(SC.OUT_OF_RANGE))

        @case(f"internal/{method}-undecodable-bytes")
        def _(ctx, method=method):
            expect(raw_call(ctx, method, b"\xff\xff\xff", ctx.md(ctx.user())), Expect(SC.INTERNAL))


_raw_cases()


@case("deadline-exceeded/watch-past-client-deadline")
def _(ctx):
    user = ctx.user()
    rid = ctx.held(user)
    watched = stream(ctx.inv.WatchReservation, inv.WatchReservationRequest(reservation_id=rid), ctx.md(user), timeout=0.5)
    expect(watched, Expect(SC.DEADLINE_EXCEEDED))
    if not watched.response:
        raise Fail("no snapshot before the deadline")


# ---- grpcio's own refusal ------------------------------------------------------


@case("grpcio/control-char-in-x-user-id-refused-locally")
def _(ctx):
    """grpc-core validates metadata before sending: a control character in
    `x-user-id` ends the call locally with INTERNAL "Invalid metadata". The
    same answer for a target where nothing listens shows it never left the
    client (otherwise: UNAVAILABLE)."""
    for value in ("a\x01b", "a\x7fb"):
        for target in (ctx.args.target, "127.0.0.1:1"):
            with grpc.insecure_channel(target) as channel:
                stub = inventory_pb2_grpc.InventoryServiceStub(channel)
                result = unary(stub.Reserve, inv.ReserveRequest(sku=ctx.sku, quantity=1), [("x-user-id", value)], timeout=3)
            err = result.error
            if err is None or err.code() != SC.INTERNAL or err.details() != "Invalid metadata":
                got = "OK" if err is None else f"{err.code().name} {err.details()!r}"
                raise Fail(f"x-user-id {value!r} to {target}: want local INTERNAL 'Invalid metadata', got {got}")
    note("grpcio refuses x-user-id with 0x01 / 0x7f before sending: INTERNAL 'Invalid metadata' (same against a dead port)")


# ---- ABORTED -------------------------------------------------------------------


def aborted_given(args):
    return None if args.aborted else "no --aborted USER KEY SKU given"


@case("aborted/reserve-duplicate-in-flight", when=aborted_given)
def _(ctx):
    user, key, sku = ctx.args.aborted
    expect(ctx.reserve(user, sku=sku, quantity=1, key=key), Expect(SC.ABORTED, reason="DUPLICATE_IN_FLIGHT"))


# ---- reflection ----------------------------------------------------------------


@case("reflection/v1alpha-list-and-find-inventory")
def _(ctx):
    database = ProtoReflectionDescriptorDatabase(ctx.channel)
    try:
        services = list(database.get_services())
        if INVENTORY not in services:
            raise Fail(f"v1alpha list_services: {services}")
        found = database.FindFileContainingSymbol(INVENTORY)
    except grpc.RpcError as err:
        raise Fail(f"v1alpha reflection: {err.code().name}: {err.details()!r}")
    if found.name != "stockgate/v1/inventory.proto":
        raise Fail(f"v1alpha file_containing_symbol: {found.name}")


@case("reflection/v1-list-and-find-inventory")
def _(ctx):
    # grpcio-reflection 1.85 has no v1 client; v1 messages are wire-identical
    # to v1alpha's, so the v1alpha classes serve on the v1 path.
    method = ctx.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INVENTORY),
    ]
    try:
        answers = list(method(iter(requests), timeout=TIMEOUT))
    except grpc.RpcError as err:
        raise Fail(f"v1 reflection: {err.code().name}: {err.details()!r}")
    if len(answers) != 2:
        raise Fail(f"v1: {len(answers)} answers to 2 requests")
    services = [s.name for s in answers[0].list_services_response.service]
    if INVENTORY not in services:
        raise Fail(f"v1 list_services: {services}")
    if not answers[1].file_descriptor_response.file_descriptor_proto:
        raise Fail(f"v1 file_containing_symbol: {answers[1]}")


# ---- AdminService ----------------------------------------------------------------


def admin_call(ctx, method, request, metadata=None, stub=None):
    return unary(getattr(stub or ctx.admin, method), request, ctx.auth if metadata is None else metadata)


ADMIN_OK = {
    # method: request builder (ctx -> request), check (ctx, response -> problem)
    "SetStock": (lambda c: adm.SetStockRequest(sku=c.new_sku(1), stock=7, max_per_user=2),
                 lambda c, r: None if (r.stock.db_stock, r.stock.max_per_user) == (7, 2) else f"{r.stock}"),
    "AdjustStock": (lambda c: adm.AdjustStockRequest(sku=c.new_sku(3), delta=4),
                    lambda c, r: None if r.stock.db_stock == 7 else f"db_stock {r.stock.db_stock}, want 7"),
    "GetStock": (lambda c: adm.GetStockRequest(sku=c.sku),
                 lambda c, r: None if r.stock.sku == c.sku else f"{r.stock}"),
    "GetLayers": (lambda c: adm.GetLayersRequest(),
                  lambda c, r: None if (r.layers.rate_limit, r.layers.dedup) == (True, c.args.dedup == "redis")
                  else f"rate_limit={r.layers.rate_limit} dedup={r.layers.dedup}, want True/{c.args.dedup == 'redis'}"),
    "SetLayers": (lambda c: adm.SetLayersRequest(reason="conformance: no change"),
                  lambda c, r: None if r.revision > 0 and r.layers.gate else f"{r}"),
    "ListAuditEvents": (lambda c: adm.ListAuditEventsRequest(limit=5),
                        lambda c, r: None if len(r.events) <= 5 else f"{len(r.events)} events for limit 5"),
    "ListReservations": (lambda c: adm.ListReservationsRequest(sku=c.sku, limit=1000),
                         lambda c, r: None if all(x.sku == c.sku for x in r.reservations) else "other SKUs listed"),
    "CheckInvariants": (lambda c: adm.CheckInvariantsRequest(sku=c.sku),
                        lambda c, r: None if [s.sku for s in r.skus] == [c.sku] else f"skus {[s.sku for s in r.skus]}"),
    "SetSoldOutPolicy": (lambda c: adm.SetSoldOutPolicyRequest(sku=c.new_sku(1), policy=adm.SOLD_OUT_POLICY_WAITLIST, waitlist_limit=5),
                         lambda c, r: None if (r.stock.sold_out_policy, r.stock.waitlist_limit) == (adm.SOLD_OUT_POLICY_WAITLIST, 5) else f"{r.stock}"),
}

# Requests for the UNAUTHENTICATED cases: reads, or writes the server would
# refuse anyway, so a missing auth check changes nothing.
ADMIN_HARMLESS = {
    "SetStock": lambda c: adm.SetStockRequest(sku=""),
    "AdjustStock": lambda c: adm.AdjustStockRequest(sku="", delta=1),
    "GetStock": lambda c: adm.GetStockRequest(sku=c.sku),
    "GetLayers": lambda c: adm.GetLayersRequest(),
    "SetLayers": lambda c: adm.SetLayersRequest(db_check=99),
    "ListAuditEvents": lambda c: adm.ListAuditEventsRequest(limit=1),
    "ListReservations": lambda c: adm.ListReservationsRequest(sku=c.sku, limit=1),
    "CheckInvariants": lambda c: adm.CheckInvariantsRequest(sku=c.sku),
    "SetSoldOutPolicy": lambda c: adm.SetSoldOutPolicyRequest(sku=""),
}

ADMIN_INVALID = [
    # (case suffix, method, request builder, field)
    ("SetStock-empty-sku", "SetStock", lambda c: adm.SetStockRequest(sku="", stock=1), "sku"),
    ("SetStock-negative-stock", "SetStock", lambda c: adm.SetStockRequest(sku=c.sku, stock=-1), "stock"),
    ("SetStock-huge-max-per-user", "SetStock", lambda c: adm.SetStockRequest(sku=c.sku, stock=1, max_per_user=2**31), "max_per_user"),
    ("AdjustStock-zero-delta", "AdjustStock", lambda c: adm.AdjustStockRequest(sku=c.sku, delta=0), "delta"),
    ("AdjustStock-bad-sku", "AdjustStock", lambda c: adm.AdjustStockRequest(sku="a b", delta=1), "sku"),
    ("GetStock-empty-sku", "GetStock", lambda c: adm.GetStockRequest(sku=""), "sku"),
    ("SetLayers-unknown-db-check", "SetLayers", lambda c: adm.SetLayersRequest(db_check=99), "db_check"),
    ("SetLayers-unknown-gate-failure-mode", "SetLayers", lambda c: adm.SetLayersRequest(gate_failure_mode=99), "gate_failure_mode"),
    ("SetLayers-zero-per-user-burst", "SetLayers",
     lambda c: adm.SetLayersRequest(rate_limits=adm.RateLimitSettings(per_user_period_ms=1000, per_user_burst=0, global_per_sec=10, global_burst=10)),
     "rate_limits.per_user_burst"),
    ("ListAuditEvents-limit-1001", "ListAuditEvents", lambda c: adm.ListAuditEventsRequest(limit=1001), "limit"),
    ("ListReservations-state-queued", "ListReservations", lambda c: adm.ListReservationsRequest(state=inv.RESERVATION_STATE_QUEUED), "state"),
    ("ListReservations-unknown-state", "ListReservations", lambda c: adm.ListReservationsRequest(state=99), "state"),
    ("ListReservations-limit-1001", "ListReservations", lambda c: adm.ListReservationsRequest(limit=1001), "limit"),
    ("ListReservations-bad-sku", "ListReservations", lambda c: adm.ListReservationsRequest(sku="a b"), "sku"),
    ("CheckInvariants-bad-sku", "CheckInvariants", lambda c: adm.CheckInvariantsRequest(sku="a b"), "sku"),
    ("SetSoldOutPolicy-unspecified-policy", "SetSoldOutPolicy", lambda c: adm.SetSoldOutPolicyRequest(sku=c.sku), "policy"),
    ("SetSoldOutPolicy-waitlist-limit-too-large", "SetSoldOutPolicy",
     lambda c: adm.SetSoldOutPolicyRequest(sku=c.sku, policy=adm.SOLD_OUT_POLICY_WAITLIST, waitlist_limit=1_000_001), "waitlist_limit"),
]

ADMIN_INVALID += [
    ("ListDeadLetters-limit-1001", "ListDeadLetters", lambda c: adm.ListDeadLettersRequest(limit=1001), "limit"),
    ("RedriveDeadLetters-no-selection", "RedriveDeadLetters", lambda c: adm.RedriveDeadLettersRequest(), "selection"),
    ("RedriveDeadLetters-keys-and-all", "RedriveDeadLetters",
     lambda c: adm.RedriveDeadLettersRequest(selection=adm.DeadLetterSelection(keys=["k"], all=True)), "selection"),
    ("RedriveDeadLetters-limit-1001", "RedriveDeadLetters",
     lambda c: adm.RedriveDeadLettersRequest(selection=adm.DeadLetterSelection(all=True, limit=1001)), "selection.limit"),
    ("RedriveDeadLetters-key-too-long", "RedriveDeadLetters",
     lambda c: adm.RedriveDeadLettersRequest(selection=adm.DeadLetterSelection(keys=["k" * 101])), "selection.keys"),
    ("PurgeDeadLetters-no-reason", "PurgeDeadLetters",
     lambda c: adm.PurgeDeadLettersRequest(selection=adm.DeadLetterSelection(all=True)), "reason"),
]

# The dead-letter calls on a queue that keeps none (this server's embedded
# queue): refused without the token, and FAILED_PRECONDITION with it.
ADMIN_DEAD_LETTERS = {
    "ListDeadLetters": lambda c: adm.ListDeadLettersRequest(limit=1),
    "RedriveDeadLetters": lambda c: adm.RedriveDeadLettersRequest(selection=adm.DeadLetterSelection(all=True)),
    "PurgeDeadLetters": lambda c: adm.PurgeDeadLettersRequest(selection=adm.DeadLetterSelection(all=True), reason="conformance"),
}

ADMIN_NOT_FOUND = {
    "AdjustStock": lambda c: adm.AdjustStockRequest(sku=c.unknown_sku, delta=1),
    "GetStock": lambda c: adm.GetStockRequest(sku=c.unknown_sku),
    "SetSoldOutPolicy": lambda c: adm.SetSoldOutPolicyRequest(sku=c.unknown_sku, policy=adm.SOLD_OUT_POLICY_INSTANT),
}

# Admin calls that need the service ready (the others read the database).
ADMIN_NEEDS_READY = {
    "SetStock": lambda c: adm.SetStockRequest(sku=c.unknown_sku, stock=1),
    "AdjustStock": lambda c: adm.AdjustStockRequest(sku=c.unknown_sku, delta=1),
    "GetStock": lambda c: adm.GetStockRequest(sku=c.unknown_sku),
    "SetSoldOutPolicy": lambda c: adm.SetSoldOutPolicyRequest(sku=c.unknown_sku, policy=adm.SOLD_OUT_POLICY_INSTANT),
}


def _admin_cases():
    for method, (build, check) in ADMIN_OK.items():

        @case(f"ok/admin-{method}")
        def _(ctx, method=method, build=build, check=check):
            response = ok(admin_call(ctx, method, build(ctx)), method)
            complaint = check(ctx, response)
            if complaint:
                raise Fail(complaint)

        @case(f"unauthenticated/admin-{method}")
        def _(ctx, method=method):
            request = ADMIN_HARMLESS[method](ctx)
            found = []
            for label, metadata in (("no token", []), ("wrong token", [("authorization", f"Bearer {ctx.args.token}x")])):
                result = admin_call(ctx, method, request, metadata)
                found += [f"{label}: {p}" for p in problems(result, Expect(SC.UNAUTHENTICATED, reason="UNAUTHENTICATED"))]
            if found:
                raise Fail("; ".join(found))

    for method, build in ADMIN_DEAD_LETTERS.items():

        @case(f"failed-precondition/admin-{method}-no-dead-letter-queue")
        def _(ctx, method=method, build=build):
            expect(admin_call(ctx, method, build(ctx)), Expect(SC.FAILED_PRECONDITION, reason="NO_DEAD_LETTER_QUEUE"))

        @case(f"unauthenticated/admin-{method}")
        def _(ctx, method=method, build=build):
            result = admin_call(ctx, method, build(ctx), [("authorization", f"Bearer {ctx.args.token}x")])
            expect(result, Expect(SC.UNAUTHENTICATED, reason="UNAUTHENTICATED"))

    for suffix, method, build, field in ADMIN_INVALID:

        @case(f"invalid/admin-{suffix}")
        def _(ctx, method=method, build=build, field=field):
            expect(admin_call(ctx, method, build(ctx)), invalid(field))

    for method, build in ADMIN_NOT_FOUND.items():

        @case(f"not-found/admin-{method}-unknown-sku")
        def _(ctx, method=method, build=build):
            expect(admin_call(ctx, method, build(ctx)), Expect(SC.NOT_FOUND, reason="UNKNOWN_SKU"))


_admin_cases()


@case("failed-precondition/admin-AdjustStock-below-zero")
def _(ctx):
    sku = ctx.new_sku(1)
    expect(admin_call(ctx, "AdjustStock", adm.AdjustStockRequest(sku=sku, delta=-5)), Expect(SC.FAILED_PRECONDITION, reason="STOCK_BELOW_ZERO"))
    left = ok(admin_call(ctx, "GetStock", adm.GetStockRequest(sku=sku)), "GetStock").stock.db_stock
    if left != 1:
        raise Fail(f"stock changed to {left} by a refused adjustment")


@case("failed-precondition/admin-SetLayers-unsafe-without-force")
def _(ctx):
    request = adm.SetLayersRequest(gate=False, db_check=adm.DB_CHECK_MODE_OFF, reason="conformance: must be refused")
    result = admin_call(ctx, "SetLayers", request)
    if result.error is None:
        # Applied: put the guards back before anything else runs.
        admin_call(ctx, "SetLayers", adm.SetLayersRequest(gate=True, db_check=adm.DB_CHECK_MODE_OPTIMISTIC, reason="conformance: undo"))
    expect(result, Expect(SC.FAILED_PRECONDITION, reason="UNSAFE_LAYER_CHANGE"))


# ---- the not-ready server ----------------------------------------------------


@case("not-ready/health-not-serving")
def _(ctx):
    health = health_pb2_grpc.HealthStub(ctx.nr_channel)
    for service in ("", INVENTORY):
        answer = ok(unary(health.Check, health_pb2.HealthCheckRequest(service=service)), "Check")
        if answer.status != health_pb2.HealthCheckResponse.NOT_SERVING:
            raise Fail(f"Check({service!r}): {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")


NOT_READY = Expect(SC.UNAVAILABLE, reason="NOT_READY", retry=True)


@reserve_case("not-ready/reserve-unavailable")
def _(ctx, key):
    result = ctx.reserve(ctx.user(), key=key, channel_inv=ctx.nr_inv)
    expect(result, Expect(SC.UNAVAILABLE, reason="NOT_READY", retry=True, message=names_the_gate))


def _not_ready_cases():
    for method in METHODS:

        @case(f"not-ready/{method}-unavailable")
        def _(ctx, method=method):
            expect(by_id(ctx, method, str(uuid.uuid4()), ctx.user(), stub=ctx.nr_inv), NOT_READY)

    for method, build in ADMIN_NEEDS_READY.items():

        @case(f"not-ready/admin-{method}-unavailable")
        def _(ctx, method=method, build=build):
            expect(admin_call(ctx, method, build(ctx), stub=ctx.nr_admin), NOT_READY)


_not_ready_cases()


# ---- driver --------------------------------------------------------------------

NOTES = []


def note(text):
    NOTES.append(text)


def wait_serving(channel, what):
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    last = None
    while time.monotonic() < deadline:
        result = unary(health.Check, health_pb2.HealthCheckRequest(), timeout=2)
        if result.error is None:
            return result.response.status
        last = f"{result.error.code().name}: {result.error.details()}"
        time.sleep(0.5)
    raise Fail(f"{what} did not answer health checks within 60 s ({last})")


def setup(ctx):
    if wait_serving(ctx.channel, "--target") != health_pb2.HealthCheckResponse.SERVING:
        # Give it a moment more to become ready.
        health = health_pb2_grpc.HealthStub(ctx.channel)
        for _ in range(60):
            if ok(unary(health.Check, health_pb2.HealthCheckRequest()), "Check").status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.5)
    wait_serving(ctx.nr_channel, "--not-ready")
    ok(unary(ctx.admin.SetStock, adm.SetStockRequest(sku=ctx.sku, stock=100_000), ctx.auth), "setup SetStock main")
    ok(unary(ctx.admin.SetStock, adm.SetStockRequest(sku=ctx.empty_sku, stock=0), ctx.auth), "setup SetStock empty")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--not-ready", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--dedup", choices=("off", "redis"), required=True)
    parser.add_argument("--hold-ttl-secs", type=int, required=True)
    parser.add_argument("--aborted", nargs=3, metavar=("USER", "KEY", "SKU"))
    parser.add_argument("--only", help="run only cases whose name contains this")
    args = parser.parse_args()

    ctx = Ctx(args)
    passed = failed = 0
    try:
        setup(ctx)
    except Fail as err:
        print(f"FAIL setup: {err}")
        print("conformance: 0 passed, 1 failed")
        return 1
    print(f"# run {ctx.run}: target {args.target}, not-ready {args.not_ready}, dedup {args.dedup}")
    for name, fn, when in CASES:
        if args.only and args.only not in name:
            continue
        skip = when(args) if when else None
        if skip:
            print(f"SKIP {name}: {skip}")
            continue
        try:
            fn(ctx)
        except Skip as why:
            print(f"SKIP {name}: {why}")
            continue
        except Fail as why:
            failed += 1
            print(f"FAIL {name}: {why}", flush=True)
            continue
        except Exception as exc:  # a bug here, or an unexpected answer shape
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        passed += 1
        print(f"PASS {name}", flush=True)
        while NOTES:
            print(f"  # {NOTES.pop(0)}")
    print(f"conformance: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
