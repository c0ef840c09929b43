//! A call's whole answer (HTTP status, headers, body, trailers), kept
//! to be replayed byte for byte, in a compact binary form for the store.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

/// The first call's whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
}

fn pairs(map: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// Lengths are u32: a stored answer is a Reserve reply, far below that.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, Vec<u8>)]) {
    out.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (name, value) in pairs {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| "stored answer cut short".to_owned())?;
        self.0 = rest;
        Ok(head)
    }

    fn len(&mut self) -> Result<usize, String> {
        let raw: [u8; 4] = self.take(4)?.try_into().map_err(|_| "short length")?;
        Ok(u32::from_be_bytes(raw) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }

    fn pairs(&mut self) -> Result<Vec<(String, Vec<u8>)>, String> {
        let n = self.len()?;
        // Each pair takes at least 8 bytes: a corrupt count cannot make
        // this allocate more than the record's size.
        let mut pairs = Vec::with_capacity(n.min(self.0.len() / 8));
        for _ in 0..n {
            let name = std::str::from_utf8(self.bytes()?)
                .map_err(|_| "header name is not UTF-8".to_owned())?
                .to_owned();
            pairs.push((name, self.bytes()?.to_vec()));
        }
        Ok(pairs)
    }
}

fn header_map(pairs: &[(String, Vec<u8>)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

impl StoredAnswer {
    pub(super) async fn capture(
        response: http::Response<tonic::body::Body>,
    ) -> Result<Self, String> {
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().map(pairs).unwrap_or_default();
        Ok(Self {
            status: parts.status.as_u16(),
            headers: pairs(&parts.headers),
            trailers,
            body: collected.to_bytes().to_vec(),
        })
    }

    /// A successful unary gRPC answer carrying `message` (encoded), framed
    /// as tonic frames it on this server (no compression is offered): one
    /// uncompressed length-prefixed message, then `grpc-status: 0`.
    pub fn grpc_ok(message: &[u8]) -> Self {
        let mut body = Vec::with_capacity(5 + message.len());
        body.push(0);
        body.extend_from_slice(
            &u32::try_from(message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        body.extend_from_slice(message);
        Self {
            status: 200,
            headers: vec![("content-type".into(), b"application/grpc".to_vec())],
            body,
            trailers: vec![("grpc-status".into(), b"0".to_vec())],
        }
    }

    /// The one message of a request or answer framed as [`grpc_ok`] frames
    /// it; `None` for anything else (compressed, several messages, cut).
    ///
    /// [`grpc_ok`]: Self::grpc_ok
    pub fn unframe(body: &[u8]) -> Option<&[u8]> {
        let (&[0, a, b, c, d], message) = body.split_first_chunk::<5>()? else {
            return None;
        };
        (u32::from_be_bytes([a, b, c, d]) as usize == message.len()).then_some(message)
    }

    pub fn to_response(&self) -> http::Response<tonic::body::Body> {
        let body = if self.body.is_empty() && self.trailers.is_empty() {
            // A trailers-only answer (every error): the body must say it is
            // over before it is polled, so that the status goes out in one
            // HEADERS frame with END_STREAM. A stream body cannot say so and
            // makes hyper send the headers and then an empty DATA frame with
            // END_STREAM, which grpc-core clients read as a stream with no
            // status (UNKNOWN "Stream removed").
            tonic::body::Body::empty()
        } else {
            let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Vec::new();
            if !self.body.is_empty() {
                frames.push(Ok(Frame::data(Bytes::from(self.body.clone()))));
            }
            if !self.trailers.is_empty() {
                frames.push(Ok(Frame::trailers(header_map(&self.trailers))));
            }
            tonic::body::Body::new(StreamBody::new(futures::stream::iter(frames)))
        };
        let mut response = http::Response::new(body);
        *response.status_mut() =
            http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::OK);
        *response.headers_mut() = header_map(&self.headers);
        response
    }

    /// Appends the answer in a compact binary form: the status, then each
    /// header list and the body, every list and field length-prefixed.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.status.to_be_bytes());
        put_pairs(out, &self.headers);
        put_bytes(out, &self.body);
        put_pairs(out, &self.trailers);
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut input = Reader(bytes);
        let status = u16::from_be_bytes(
            input
                .take(2)?
                .try_into()
                .map_err(|_| "short status".to_owned())?,
        );
        let headers = input.pairs()?;
        let body = input.bytes()?.to_vec();
        let trailers = input.pairs()?;
        if !input.0.is_empty() {
            return Err("trailing bytes after a stored answer".into());
        }
        Ok(Self {
            status,
            headers,
            body,
            trailers,
        })
    }

    /// The gRPC status code (trailers, or headers for a trailers-only
    /// answer).
    pub(super) fn grpc_code(&self) -> Option<tonic::Code> {
        self.trailers
            .iter()
            .chain(&self.headers)
            .find(|(name, _)| name == "grpc-status")
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<i32>().ok())
            .map(tonic::Code::from)
    }

    /// Whether a retry should get this answer: a decision (OK, including
    /// "sold out" and "over the limit" outcomes) or a verdict on the request
    /// itself. Anything transient is left for the retry to run again.
    /// Whether a retry with the same key should get this answer again: a
    /// result the request itself decided (OK, NOT_FOUND,
    /// FAILED_PRECONDITION), small enough to keep. Transient answers are
    /// retried, and a request refused as malformed (INVALID_ARGUMENT,
    /// OUT_OF_RANGE) keeps no record: it changed nothing, and a flood of
    /// junk must not fill the store.
    pub(super) fn worth_keeping(&self) -> bool {
        let decided = matches!(
            self.grpc_code(),
            Some(tonic::Code::Ok | tonic::Code::NotFound | tonic::Code::FailedPrecondition)
        );
        decided && self.size() <= super::MAX_KEPT_ANSWER
    }

    /// Bytes of headers, body and trailers.
    pub(super) fn size(&self) -> usize {
        let pairs = |pairs: &[(String, Vec<u8>)]| {
            pairs
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
        };
        pairs(&self.headers) + self.body.len() + pairs(&self.trailers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_plain_message_unframes_and_nothing_else_does() {
        let answer = StoredAnswer::grpc_ok(b"hello");
        assert_eq!(StoredAnswer::unframe(&answer.body), Some(&b"hello"[..]));
        assert!(answer.worth_keeping());
        let mut compressed = answer.body.clone();
        compressed[0] = 1;
        assert_eq!(StoredAnswer::unframe(&compressed), None);
        let mut two = answer.body.clone();
        two.extend_from_slice(&answer.body);
        assert_eq!(StoredAnswer::unframe(&two), None);
        assert_eq!(StoredAnswer::unframe(&answer.body[..4]), None);
        assert_eq!(StoredAnswer::unframe(&answer.body[..7]), None);
    }
}
