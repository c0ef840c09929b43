"""Raw HTTP/2 frame checks against stockgate (python `h2`, not grpcio).

Usage:
  h2_frames.py --target HOST:PORT --dedup {off,redis} [--token TOKEN]
  h2_frames.py --target HOST:PORT --slow-sku SKU

Speaks gRPC by hand over a plain TCP socket and looks at the frames, which
grpc libraries hide:

1. An error answer is trailers-only: ONE HEADERS frame with END_STREAM that
   carries `grpc-status`, and no DATA frame (unknown SKU, with and without an
   idempotency key, and its replay). A success is HEADERS, DATA, then
   trailers (HEADERS with END_STREAM, `grpc-status: 0`).
2. A control character (0x01, 0x7f) in `x-user-id`: what the server does to
   that stream, to the connection (GOAWAY and its error code and
   last_stream_id) and to innocent streams open on the same connection, and
   whether a new connection works afterwards. The case
   `control-char-in-x-user-id-closes-connection` pins today's behaviour: it
   passes when a GOAWAY arrives and a new connection works.

3. With `--slow-sku` (a SKU whose Reserve takes longer than 300 ms, e.g.
   behind a slowed database), only the deadline case runs: a Reserve sent
   with `grpc-timeout: 300m` must be answered by the server itself with
   DEADLINE_EXCEEDED (grpc-status 4, trailers-only, ErrorInfo reason
   DEADLINE_EXCEEDED) before that deadline has long passed. Client
   libraries enforce deadlines themselves and hide what the server sent.

`--token` (or STOCKGATE_ADMIN_TOKEN) lets it create a SKU through
AdminService for the success and watch cases; without a usable one those
parts are skipped. Prints `PASS name`, `FAIL name: why` or `SKIP name: why`,
then `h2_frames: N passed, N failed`; exit status 1 if any failed.
"""

import argparse
import base64
import os
import secrets
import socket
import struct
import sys
import time
import uuid

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from stockgate.v1 import admin_pb2, inventory_pb2

RESERVE = "/stockgate.v1.InventoryService/Reserve"
WATCH = "/stockgate.v1.InventoryService/WatchReservation"
SET_STOCK = "/stockgate.v1.AdminService/SetStock"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


class Fail(Exception):
    pass


class Skip(Exception):
    pass


def grpc_frame(message) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def error_name(code):
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class Stream:
    """What arrived on one stream, in order."""

    def __init__(self, stream_id, label):
        self.id = stream_id
        self.label = label
        self.frames = []  # ("HEADERS", headers, end) / ("DATA", bytes, end) / ("TRAILERS", headers, end) / ("RST", code)
        self.ended = False
        self.reset = None

    def headers(self, kind="HEADERS"):
        for frame in self.frames:
            if frame[0] == kind:
                return frame[1]
        return {}

    def grpc_status(self):
        for kind in ("TRAILERS", "HEADERS"):
            status = self.headers(kind).get("grpc-status")
            if status is not None:
                return status
        return None

    def describe(self):
        parts = []
        for frame in self.frames:
            if frame[0] == "RST":
                parts.append(f"RST_STREAM({error_name(frame[1])})")
                continue
            kind, payload, end = frame
            end = "+END_STREAM" if end else ""
            if kind == "DATA":
                parts.append(f"DATA({len(payload)}B){end}")
            else:
                shown = {k: v for k, v in payload.items() if k in (":status", "grpc-status", "grpc-message")}
                parts.append(f"{kind}{shown}{end}")
        return ", ".join(parts) or "nothing"


class Conn:
    """One client connection; `pump` reads frames into per-stream records."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = target
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()
        self.streams = {}
        self.goaway = None  # ConnectionTerminated
        self.closed = False  # TCP closed by the peer
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def request(self, path, metadata, message, label="", end=True):
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", self.target.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ] + [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in metadata]
        self.streams[stream_id] = Stream(stream_id, label or path)
        self.h2.send_headers(stream_id, headers)
        self.h2.send_data(stream_id, grpc_frame(message), end_stream=end)
        self.flush()
        return self.streams[stream_id]

    def pump(self, until, timeout=5.0):
        """Reads until `until()` is true, the peer closes, or `timeout`."""
        deadline = time.monotonic() + timeout
        while not until() and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as err:
                raise Fail(f"client h2 refused the server's frames: {err!r}")
            for event in events:
                self.record(event)
            self.flush()
        return until()

    def record(self, event):
        stream = self.streams.get(getattr(event, "stream_id", None))
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif stream is None:
            return
        elif isinstance(event, h2.events.ResponseReceived):
            stream.frames.append(("HEADERS", decode(event.headers), bool(event.stream_ended)))
        elif isinstance(event, h2.events.DataReceived):
            stream.frames.append(("DATA", event.data, bool(event.stream_ended)))
            try:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except h2.exceptions.ProtocolError:
                pass  # stream already closed
        elif isinstance(event, h2.events.TrailersReceived):
            stream.frames.append(("TRAILERS", decode(event.headers), bool(event.stream_ended)))
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream.frames.append(("RST", event.error_code))
            stream.reset = event.error_code

    def goaway_text(self):
        g = self.goaway
        extra = f", debug {g.additional_data!r}" if g.additional_data else ""
        return f"GOAWAY({error_name(g.error_code)}, last_stream_id={g.last_stream_id}{extra})"

    def close(self):
        try:
            if not self.closed and self.goaway is None:
                self.h2.close_connection()
                self.flush()
        except h2.exceptions.ProtocolError:
            pass
        self.sock.close()


def decode(headers):
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


def finished(stream):
    return lambda: stream.ended or stream.reset is not None


def grpc_messages(stream):
    """The protobuf payloads in a stream's DATA frames."""
    data = b"".join(f[1] for f in stream.frames if f[0] == "DATA")
    out = []
    while len(data) >= 5:
        size = struct.unpack(">I", data[1:5])[0]
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


# ---- the checks --------------------------------------------------------------


class Suite:
    def __init__(self, args):
        self.args = args
        self.run = secrets.token_hex(3)
        self.users = 0
        self.sku = None
        self.sku_problem = None
        self.passed = self.failed = 0

    def user(self):
        self.users += 1
        return f"h2-{self.run}-u{self.users}"

    def key(self):
        return f"h2-{self.run}-{uuid.uuid4().hex[:12]}"

    def report(self, name, fn):
        try:
            fn()
        except Skip as why:
            print(f"SKIP {name}: {why}", flush=True)
            return
        except Fail as why:
            self.failed += 1
            print(f"FAIL {name}: {why}", flush=True)
            return
        except Exception as exc:
            self.failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            return
        self.passed += 1
        print(f"PASS {name}", flush=True)

    def call(self, path, metadata, message, label=""):
        """One request on its own connection, read to its end."""
        conn = Conn(self.args.target)
        try:
            stream = conn.request(path, metadata, message, label)
            conn.pump(finished(stream), timeout=10)
            if not (stream.ended or stream.reset is not None):
                raise Fail(f"stream did not end: {stream.describe()}"
                           + (f"; {conn.goaway_text()}" if conn.goaway else ""))
            return stream
        finally:
            conn.close()

    def ensure_sku(self):
        if self.sku:
            return self.sku
        if self.sku_problem:
            raise Skip(self.sku_problem)
        sku = f"H2-{self.run}"
        metadata = [("x-operator", "h2_frames")]
        if self.args.token:
            metadata.append(("authorization", f"Bearer {self.args.token}"))
        stream = self.call(SET_STOCK, metadata, admin_pb2.SetStockRequest(sku=sku, stock=1000))
        if stream.grpc_status() != "0":
            self.sku_problem = (f"cannot create a SKU (SetStock grpc-status {stream.grpc_status()} "
                                f"{stream.headers().get('grpc-message', '')!r}); pass --token")
            raise Skip(self.sku_problem)
        self.sku = sku
        return sku

    # -- 1. framing ------------------------------------------------------------

    def check_trailers_only(self, stream, code):
        data = [f for f in stream.frames if f[0] == "DATA"]
        first = stream.frames[0] if stream.frames else None
        problems = []
        if first is None or first[0] != "HEADERS":
            problems.append("no response HEADERS")
        else:
            if not first[2]:
                problems.append("response HEADERS without END_STREAM")
            if first[1].get("grpc-status") != code:
                problems.append(f"HEADERS grpc-status {first[1].get('grpc-status')!r}, want {code}")
        if data:
            problems.append(f"{len(data)} DATA frame(s) on an error answer")
        if len(stream.frames) != 1:
            problems.append(f"{len(stream.frames)} frames")
        if problems:
            raise Fail("; ".join(problems) + f" [frames: {stream.describe()}]")

    def check_success(self, stream):
        kinds = [f[0] for f in stream.frames]
        problems = []
        if not kinds or kinds[0] != "HEADERS" or stream.frames[0][2]:
            problems.append("first frame is not HEADERS without END_STREAM")
        if "DATA" not in kinds or not any(f[1] for f in stream.frames if f[0] == "DATA"):
            problems.append("no DATA with the message")
        if kinds[-1:] != ["TRAILERS"] or not stream.frames[-1][2]:
            problems.append("does not end with trailers HEADERS + END_STREAM")
        elif stream.frames[-1][1].get("grpc-status") != "0":
            problems.append(f"trailers grpc-status {stream.frames[-1][1].get('grpc-status')!r}")
        if problems:
            raise Fail("; ".join(problems) + f" [frames: {stream.describe()}]")

    def deadline(self):
        """The server's own answer to a call whose deadline passes."""
        metadata = [("x-user-id", self.user()), ("idempotency-key", self.key()),
                    ("grpc-timeout", "300m")]
        request = inventory_pb2.ReserveRequest(sku=self.args.slow_sku, quantity=1)
        started = time.monotonic()
        stream = self.call(RESERVE, metadata, request)
        took = time.monotonic() - started
        self.check_trailers_only(stream, "4")
        headers = stream.headers()
        details = headers.get("grpc-status-details-bin")
        if details is None:
            raise Fail(f"no grpc-status-details-bin: {stream.describe()}")
        status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
        reasons = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append(info.reason)
        if reasons != ["DEADLINE_EXCEEDED"]:
            raise Fail(f"ErrorInfo reasons {reasons}, want DEADLINE_EXCEEDED: {stream.describe()}")
        if not 0.25 <= took < 2.0:
            raise Fail(f"answered after {took:.3f} s for a 0.3 s deadline")
        print(f"# deadline answered after {took * 1000:.0f} ms: {headers.get('grpc-message', '')!r}")

    def unknown_sku(self, with_key, replay=False):
        def run():
            md = [("x-user-id", self.user())]
            if with_key:
                md.append(("idempotency-key", self.key()))
            request = inventory_pb2.ReserveRequest(sku=f"H2-{self.run}-NOSUCH", quantity=1)
            first = self.call(RESERVE, md, request)
            if replay:
                self.check_trailers_only(first, "5")  # the first answer, stored
                first = self.call(RESERVE, md, request)
            self.check_trailers_only(first, "5")

        return run

    def success(self, with_key, replay=False):
        def run():
            sku = self.ensure_sku()
            md = [("x-user-id", self.user())]
            if with_key:
                md.append(("idempotency-key", self.key()))
            request = inventory_pb2.ReserveRequest(sku=sku, quantity=1)
            stream = self.call(RESERVE, md, request)
            self.check_success(stream)
            if replay:
                again = self.call(RESERVE, md, request)
                self.check_success(again)
                first, second = grpc_messages(stream), grpc_messages(again)
                if self.args.dedup == "redis":
                    # The dedup layer replays the first answer byte for byte.
                    if second != first:
                        raise Fail("the replayed message differs from the first")
                else:
                    # Without it the pipeline answers with the reservation
                    # that holds the key (see the contract for the one
                    # exception, a new QUEUED one that ends REJECTED).
                    ids = [inventory_pb2.ReserveResponse.FromString(m[0]).reservation.reservation_id for m in (first, second)]
                    if ids[0] != ids[1]:
                        print(f"  # retry got reservation {ids[1]}, not {ids[0]} (allowed with dedup off if it ends REJECTED)")

        return run

    # -- 2. control characters ---------------------------------------------------

    def control_char(self):
        results = []
        for byte in (b"\x01", b"\x7f"):
            results.append(self.control_char_once(byte))
        bad = [r for r in results if r]
        if bad:
            raise Fail(" | ".join(bad))

    def control_char_once(self, byte):
        """Returns a problem, or None; prints what happened either way."""
        label = f"0x{byte[0]:02x}"
        conn = Conn(self.args.target)
        innocents = []
        try:
            health = conn.request(HEALTH_WATCH, [], health_pb2.HealthCheckRequest(service=""), "health Watch")
            innocents.append(health)
            try:
                sku = self.ensure_sku()
            except Skip as why:
                print(f"  # {label}: no WatchReservation innocent stream ({why})")
                sku = None
            if sku:
                user = self.user()
                reserve = conn.request(RESERVE, [("x-user-id", user)], inventory_pb2.ReserveRequest(sku=sku, quantity=1), "Reserve")
                conn.pump(finished(reserve))
                answer = grpc_messages(reserve)
                if reserve.grpc_status() == "0" and answer:
                    rid = inventory_pb2.ReserveResponse.FromString(answer[0]).reservation.reservation_id
                    watch = conn.request(WATCH, [("x-user-id", user)], inventory_pb2.WatchReservationRequest(reservation_id=rid), "WatchReservation")
                    innocents.append(watch)
                else:
                    print(f"  # {label}: innocent Reserve failed: {reserve.describe()}")
            # Each innocent stream shows it is alive (its first message).
            conn.pump(lambda: all(any(f[0] == "DATA" for f in s.frames) or s.ended for s in innocents))
            before = {s.id: len(s.frames) for s in innocents}
            bad = conn.request(RESERVE, [("x-user-id", b"a" + byte + b"b")],
                               inventory_pb2.ReserveRequest(sku=sku or "H2-X", quantity=1), f"Reserve x-user-id a{label}b")
            conn.pump(lambda: conn.goaway is not None and conn.closed or finished(bad)(), timeout=3)
            if conn.goaway is not None and not conn.closed:
                conn.pump(lambda: False, timeout=1)  # let the rest arrive
            print(f"  # {label}: bad stream {bad.id}: {bad.describe()}")
            if conn.goaway is not None:
                print(f"  # {label}: connection: {conn.goaway_text()}, TCP {'closed' if conn.closed else 'still open'}")
            else:
                print(f"  # {label}: connection: no GOAWAY, TCP {'closed' if conn.closed else 'open'}")
            cut_off = True
            for s in innocents:
                cut_off = cut_off and not s.ended and s.reset is None
                after = s.frames[before[s.id]:]
                fate = ("completed (END_STREAM, grpc-status " + str(s.grpc_status()) + ")") if s.ended \
                    else (f"reset {error_name(s.reset)}" if s.reset is not None else "cut off (no END_STREAM, no RST_STREAM)")
                got = ", ".join(f[0] if f[0] != "RST" else "RST" for f in after) or "no frames"
                print(f"  # {label}: innocent {s.label} (stream {s.id}): after the bad stream {got}; {fate}")
        finally:
            conn.close()
        # A new connection afterwards.
        probe = self.call(HEALTH_CHECK, [], health_pb2.HealthCheckRequest(service=""))
        works = probe.grpc_status() == "0"
        print(f"  # {label}: new connection afterwards: health Check grpc-status {probe.grpc_status()}")
        # What is pinned is h2 0.4's behaviour; a change here is news to
        # write down, not necessarily a regression.
        changed = f"{label}: h2's behaviour changed (update the x-user-id note in inventory.proto, docs/architecture.md and docs/upstream-h2-report.md): "
        if conn.goaway is None:
            how = bad.describe()
            status = bad.grpc_status()
            if status == "3":
                return changed + f"no GOAWAY: INVALID_ARGUMENT on the bad stream only ({how})"
            if bad.reset is not None:
                return changed + f"no GOAWAY: RST_STREAM({error_name(bad.reset)}) on the bad stream only ({how})"
            return changed + f"no GOAWAY: bad stream {how}"
        if error_name(conn.goaway.error_code) != "PROTOCOL_ERROR":
            return changed + conn.goaway_text()
        if not cut_off:
            return changed + "an innocent stream completed or was reset instead of being cut off"
        if not works:
            return f"{label}: {conn.goaway_text()} but a new connection failed ({probe.describe()})"
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--dedup", choices=("off", "redis"))
    parser.add_argument("--token", default=os.environ.get("STOCKGATE_ADMIN_TOKEN", ""))
    parser.add_argument("--slow-sku")
    args = parser.parse_args()
    suite = Suite(args)
    if args.slow_sku:
        suite.report("deadline-exceeded-is-the-servers-answer", suite.deadline)
        print(f"h2_frames: {suite.passed} passed, {suite.failed} failed")
        return 1 if suite.failed else 0
    if args.dedup is None:
        parser.error("--dedup is required")
    print(f"# run {suite.run}: target {args.target}, dedup {args.dedup}")
    for tag, with_key in (("no-key", False), ("key", True)):
        suite.report(f"error-is-trailers-only/reserve-unknown-sku[{tag}]", suite.unknown_sku(with_key))
    suite.report("error-is-trailers-only/reserve-unknown-sku-replayed[key]", suite.unknown_sku(True, replay=True))
    for tag, with_key in (("no-key", False), ("key", True)):
        suite.report(f"success-framing/reserve[{tag}]", suite.success(with_key))
    suite.report("success-framing/reserve-replayed[key]", suite.success(True, replay=True))
    suite.report("control-char-in-x-user-id-closes-connection", suite.control_char)
    print(f"h2_frames: {suite.passed} passed, {suite.failed} failed")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
