//! TLS to PostgreSQL with rustls (the stack tonic uses): the server's
//! certificate is verified against `store.tls_ca_file` or the system's
//! roots, and its host name against the URL's, whenever the URL asks for
//! TLS; `store.tls_cert_file` and `tls_key_file` add a client certificate.

use std::sync::Arc;

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use crate::config::StoreConfig;

/// Whether a store URL asks for TLS, and the URL as tokio-postgres reads it
/// (it knows `require` but not libpq's `verify-ca` / `verify-full`, which
/// rustls's verification gives anyway).
pub fn wanted(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let mode = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sslmode="))?;
    match mode {
        "require" => Some(url.to_owned()),
        "verify-ca" | "verify-full" => {
            Some(url.replace(&format!("sslmode={mode}"), "sslmode=require"))
        }
        _ => None,
    }
}

/// The rustls client config from `store.tls_*`; errors name the key.
pub fn client_config(store: &StoreConfig) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    if store.tls_ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
    } else {
        let certs = CertificateDer::pem_file_iter(&store.tls_ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("store.tls_ca_file: cannot be read: {e}"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("store.tls_ca_file: not a CA certificate: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err("store.tls_ca_file: no CA certificate (and no system roots)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("store TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match (
        store.tls_cert_file.is_empty(),
        store.tls_key_file.is_empty(),
    ) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let chain = CertificateDer::pem_file_iter(&store.tls_cert_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("store.tls_cert_file: cannot be read: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(&store.tls_key_file)
                .map_err(|e| format!("store.tls_key_file: cannot be read: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("store.tls_cert_file / tls_key_file: {e}"))?
        }
        _ => return Err("store.tls_cert_file: set with tls_key_file, or neither".into()),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_urls_that_ask_for_tls_get_it() {
        assert_eq!(wanted("postgres://a@h/db"), None);
        assert_eq!(wanted("postgres://a@h/db?sslmode=disable"), None);
        assert_eq!(wanted("postgres://a@h/db?sslmode=prefer"), None);
        assert_eq!(
            wanted("postgres://a@h/db?sslmode=require").as_deref(),
            Some("postgres://a@h/db?sslmode=require")
        );
        assert_eq!(
            wanted("postgres://a@h/db?application_name=x&sslmode=verify-full").as_deref(),
            Some("postgres://a@h/db?application_name=x&sslmode=require")
        );
    }
}
