//! TLS to PostgreSQL with rustls (the stack tonic uses): the server's
//! certificate is verified against `store.tls_ca_file` or the system's
//! roots, and its host name against the URL's, whenever the URL asks for
//! TLS; `store.tls_cert_file` and `tls_key_file` add a client certificate.

use std::sync::Arc;

use rustls::ClientConfig;

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

/// The rustls client config from `store.tls_*`, and what a refused
/// handshake should name; errors name the key.
pub fn client_config(store: &StoreConfig) -> Result<(Arc<ClientConfig>, String), String> {
    let pem = store.tls_files().read()?;
    Ok((pem.rustls()?, pem.hint("backends.store's sslmode")))
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
