//! The calling service's identity, with mutual TLS (`server.tls.
//! client_ca_path`): read from the client certificate the TLS handshake
//! verified, checked against `server.tls.allowed_clients`, and attached to
//! the request as [`CallerIdentity`] for the audit trail. A caller whose
//! certificate names no allowed identity is refused PERMISSION_DENIED
//! (CALLER_NOT_ALLOWED) on every call but health checks.

use std::{
    collections::HashSet,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::error::ReservationError;

/// Who called, as their client certificate says (`spiffe://…`, `dns:…` or
/// `cn:…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity(pub Arc<str>);

/// Health checks are answered whoever asks (monitoring holds a certificate
/// from the CA but need not be on the allow-list).
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// A certificate's identities, in order of preference: URI SANs, DNS SANs
/// (`dns:`), subject common names (`cn:`).
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                GeneralName::DNSName(name) => dns.push(format!("dns:{name}")),
                _ => {}
            }
        }
    }
    let cns = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(|cn| format!("cn:{cn}")));
    uris.into_iter().chain(dns).chain(cns).collect()
}

#[derive(Clone)]
pub struct IdentityLayer {
    /// `None`: any certificate the CA signed.
    allowed: Option<Arc<HashSet<String>>>,
}

impl IdentityLayer {
    pub fn new(allowed: &[String]) -> Self {
        Self {
            allowed: (!allowed.is_empty()).then(|| Arc::new(allowed.iter().cloned().collect())),
        }
    }

    /// The identity to record, or the refusal.
    fn identify<B>(&self, request: &http::Request<B>) -> Result<CallerIdentity, ReservationError> {
        let identities = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| {
                certs
                    .first()
                    .map(|leaf| certificate_identities(leaf.as_ref()))
            })
            .unwrap_or_default();
        let chosen = match &self.allowed {
            None => identities.first(),
            Some(allowed) => identities.iter().find(|id| allowed.contains(*id)),
        };
        match (chosen, identities.first()) {
            (Some(id), _) => Ok(CallerIdentity(id.as_str().into())),
            // A certificate the CA signed that names nobody (or that does
            // not parse) cannot be on any list.
            (None, None) => Err(ReservationError::CallerNotAllowed(
                "(the certificate names no identity)".into(),
            )),
            (None, Some(first)) => Err(ReservationError::CallerNotAllowed(
                crate::telemetry::truncated(first, 200).into_owned(),
            )),
        }
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = Identify<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Identify {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Identify<S> {
    inner: S,
    layer: IdentityLayer,
}

type HttpRequest = http::Request<tonic::body::Body>;

impl<S> Service<HttpRequest> for Identify<S>
where
    S: Service<HttpRequest, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: HttpRequest) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        match self.layer.identify(&request) {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                Box::pin(inner.call(request))
            }
            Err(_) if request.uri().path().starts_with(HEALTH_PREFIX) => {
                Box::pin(inner.call(request))
            }
            Err(refusal) => {
                crate::metrics::decision("identity", "refused");
                if let Some(left_out) = REFUSALS.admit() {
                    tracing::warn!(error = %refusal, left_out, "caller refused");
                }
                let status = tonic::Status::from(refusal);
                Box::pin(async move { Ok(super::refuse_after_reading(request, status).await) })
            }
        }
    }
}

static REFUSALS: crate::telemetry::Sampled = crate::telemetry::Sampled::new();
