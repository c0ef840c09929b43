//! Hostile input over the wire: bytes a decoder has to reject, unknown
//! fields, extreme values, oversized messages, bad metadata. Each gets the
//! documented status, nothing panics, and the checker finds nothing
//! changed but the one valid reservation.

use bytes::{Buf, BufMut};
use stockgate::pb::CheckInvariantsRequest;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataValue,
    transport::Channel,
    Code, Request, Status,
};

use crate::harness::{Profile, TestApp};

/// Sends and receives raw message bytes, so a test can put anything on the
/// wire.
#[derive(Default, Clone)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

async fn reserve_raw(
    channel: &Channel,
    body: Vec<u8>,
    user: Option<&[u8]>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = Request::new(body);
    if let Some(user) = user {
        request.metadata_mut().insert(
            "x-user-id",
            MetadataValue::try_from(user).expect("a header value"),
        );
    }
    let path = http::uri::PathAndQuery::from_static("/stockgate.v1.InventoryService/Reserve");
    grpc.unary(request, path, Raw).await.map(|r| r.into_inner())
}

/// An oversized Reserve is refused OUT_OF_RANGE with dedup on too, where
/// the sold-out fast path could answer it at once: the at-once answer keeps
/// the server's message limit, and no answer is stored for the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_with_dedup_on_too() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.layers.dedup.enabled = true;
        c.layers.gate.sold_out_cache_ms = 60_000;
        c.server.max_message_bytes = 1024;
    })
    .await;
    app.set_stock("TINY", 0, 0).await;
    let channel = crate::harness::connect(app.addr).await;
    let keyed = |body: Vec<u8>, key: &'static str| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let mut request = Request::new(body);
            request
                .metadata_mut()
                .insert("x-user-id", MetadataValue::from_static("mallory"));
            request
                .metadata_mut()
                .insert("idempotency-key", MetadataValue::from_static(key));
            let path =
                http::uri::PathAndQuery::from_static("/stockgate.v1.InventoryService/Reserve");
            grpc.unary(request, path, Raw).await.map(|r| r.into_inner())
        }
    };
    // The gate says sold out once; the fast path knows it after that.
    keyed(message(b"TINY", 1, &[]), "small").await.unwrap();
    // Padded with an unknown field (15, bytes): valid, but over the limit.
    let mut padding = vec![0x7a];
    varint(&mut padding, 2_000);
    padding.extend_from_slice(&[0; 2_000]);
    for attempt in ["first", "retry"] {
        let status = keyed(message(b"TINY", 1, &padding), "big")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{attempt}: {status:?}");
    }
    app.stop().await;
}

/// A ReserveRequest's bytes: field 1 (sku, bytes as given), field 2
/// (quantity, varint), then `extra`.
fn message(sku: &[u8], quantity: u64, extra: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0a];
    varint(&mut out, sku.len() as u64);
    out.extend_from_slice(sku);
    out.push(0x10);
    varint(&mut out, quantity);
    out.extend_from_slice(extra);
    out
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_get_the_documented_status_and_change_nothing() {
    let app = TestApp::spawn(Profile::Embedded).await;
    app.set_stock("HOSTILE", 20, 0).await;
    let channel = crate::harness::connect(app.addr).await;
    let user: Option<&[u8]> = Some(b"mallory");
    let code = |result: Result<Vec<u8>, Status>| match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    let named = |result: Result<Vec<u8>, Status>, field: &str| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    };
    let max = app.config.reservations.max_quantity as u64;

    // Not protobuf; a string field that is not UTF-8; a truncated field.
    for garbage in [
        vec![0xff, 0xff, 0xff, 0xff],
        message(&[0xc3, 0x28], 1, &[]),
        vec![0x0a, 0x20, b'A'],
    ] {
        assert_eq!(
            code(reserve_raw(&channel, garbage, user).await),
            Code::Internal
        );
    }
    // Larger than server.max_message_bytes.
    let huge = message(&vec![b'A'; app.config.server.max_message_bytes + 1], 1, &[]);
    assert_eq!(
        code(reserve_raw(&channel, huge, user).await),
        Code::OutOfRange
    );
    // Extreme quantities, empty and long SKUs, missing and non-ASCII metadata.
    // (A varint beyond uint32 is truncated by the decoder: u64::MAX reads
    // as u32::MAX, still refused.)
    for quantity in [0, max + 1, u32::MAX as u64, u64::MAX] {
        let result = reserve_raw(&channel, message(b"HOSTILE", quantity, &[]), user).await;
        named(result, "quantity");
    }
    named(
        reserve_raw(&channel, message(b"", 1, &[]), user).await,
        "sku",
    );
    named(
        reserve_raw(&channel, message(&[b'A'; 10_000], 1, &[]), user).await,
        "sku",
    );
    named(
        reserve_raw(&channel, message("SKÜ".as_bytes(), 1, &[]), user).await,
        "sku",
    );
    named(
        reserve_raw(&channel, message(b"HOSTILE", 1, &[]), None).await,
        "x-user-id",
    );
    named(
        reserve_raw(
            &channel,
            message(b"HOSTILE", 1, &[]),
            Some(&[0xe9, b'v', b'e']),
        )
        .await,
        "x-user-id",
    );
    // Unknown fields are ignored (proto3): this one is a valid call.
    let unknown = [0xf8, 0x06, 0x2a]; // field 111, varint 42
    let answer = reserve_raw(&channel, message(b"HOSTILE", max, &unknown), user).await;
    assert!(answer.is_ok(), "{answer:?}");

    app.drain("HOSTILE").await;
    let stock = app.stock("HOSTILE").await;
    let max = max as i64;
    assert_eq!((stock.db_stock, stock.held_units), (20 - max, max));
    let report = app
        .admin()
        .check_invariants(CheckInvariantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    app.stop().await;
}
