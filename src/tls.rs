//! Client TLS to the backends, with rustls (the stack tonic uses) for all
//! three. Each backend's section names its files (`store.tls_ca_file`,
//! `redis.tls_ca_file`, `rabbitmq.tls_ca_file`, each with `tls_cert_file`
//! and `tls_key_file`); they are read and checked once at start-up, so a
//! missing or malformed file stops start-up with the key to fix. Whether a
//! connection uses TLS is the URL's choice (`sslmode`, `rediss://`,
//! `amqps://`), as each client library reads it.

use std::sync::Arc;

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

/// One section's `tls_*` keys.
pub struct TlsFiles<'a> {
    /// The section, for errors: `redis` gives `redis.tls_ca_file`.
    pub section: &'static str,
    pub ca_file: &'a str,
    pub cert_file: &'a str,
    pub key_file: &'a str,
}

/// The PEM the files held, checked: at least one CA certificate if a CA
/// file is set, and a chain with its key if a client certificate is.
#[derive(Clone)]
pub struct TlsPem {
    /// The section the files came from, for errors.
    pub section: &'static str,
    /// The CA certificates to trust: instead of the system's roots for
    /// PostgreSQL and Redis, besides them for RabbitMQ (lapin's rustls).
    pub ca: Option<Arc<Vec<u8>>>,
    /// A client certificate chain and its key.
    pub identity: Option<Arc<(Vec<u8>, Vec<u8>)>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("section", &self.section)
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl TlsFiles<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.section)
    }

    /// Whether any of the keys is set.
    pub fn any(&self) -> bool {
        !(self.ca_file.is_empty() && self.cert_file.is_empty() && self.key_file.is_empty())
    }

    /// Reads and checks the files; errors name the key.
    pub fn read(&self) -> Result<TlsPem, String> {
        let ca = if self.ca_file.is_empty() {
            None
        } else {
            let pem = std::fs::read(self.ca_file)
                .map_err(|e| format!("{}: cannot be read: {e}", self.key("tls_ca_file")))?;
            let certs =
                certificates(&pem).map_err(|e| format!("{}: {e}", self.key("tls_ca_file")))?;
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    format!("{}: not a CA certificate: {e}", self.key("tls_ca_file"))
                })?;
            }
            Some(Arc::new(pem))
        };
        let identity = match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (true, true) => None,
            (false, false) => {
                let chain = std::fs::read(self.cert_file)
                    .map_err(|e| format!("{}: cannot be read: {e}", self.key("tls_cert_file")))?;
                certificates(&chain).map_err(|e| format!("{}: {e}", self.key("tls_cert_file")))?;
                let key = std::fs::read(self.key_file)
                    .map_err(|e| format!("{}: cannot be read: {e}", self.key("tls_key_file")))?;
                PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| format!("{}: no private key: {e}", self.key("tls_key_file")))?;
                Some(Arc::new((chain, key)))
            }
            _ => {
                return Err(format!(
                    "{}: set with {}, or neither",
                    self.key("tls_cert_file"),
                    self.key("tls_key_file")
                ))
            }
        };
        Ok(TlsPem {
            section: self.section,
            ca,
            identity,
        })
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

impl TlsPem {
    /// Whether the section set a CA or a client certificate.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// Where a failed handshake's fix lies, for errors and logs.
    pub fn hint(&self, url_key: &str) -> String {
        let section = self.section;
        let ca = match self.ca {
            // lapin's rustls adds a configured CA to the system roots.
            Some(_) if section == "rabbitmq" => {
                format!("CA from {section}.tls_ca_file and the system roots")
            }
            Some(_) => format!("CA from {section}.tls_ca_file"),
            None => format!("the system roots ({section}.tls_ca_file unset)"),
        };
        let client = match self.identity {
            Some(_) => format!("client certificate from {section}.tls_cert_file"),
            None => format!("no client certificate ({section}.tls_cert_file unset)"),
        };
        format!("TLS per {url_key}, verified with {ca}, {client}")
    }

    /// A rustls client config: the CA (or the system roots), the client
    /// certificate if any, ring as the crypto provider.
    pub fn rustls(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(pem) => {
                for cert in certificates(pem)? {
                    roots.add(cert).map_err(|e| e.to_string())?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(format!(
                "{}.tls_ca_file: unset, and the system has no CA certificates",
                self.section
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{} TLS: {e}", self.section))?
            .with_root_certificates(roots);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                let chain = certificates(&identity.0)?;
                let key = PrivateKeyDer::from_pem_slice(&identity.1).map_err(|e| e.to_string())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{}.tls_cert_file / tls_key_file: {e}", self.section))?
            }
        };
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files<'a>(ca: &'a str, cert: &'a str, key: &'a str) -> TlsFiles<'a> {
        TlsFiles {
            section: "redis",
            ca_file: ca,
            cert_file: cert,
            key_file: key,
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_key_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let empty = empty.to_str().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        for (files, named) in [
            (files(missing, "", ""), "redis.tls_ca_file: cannot be read"),
            (files(empty, "", ""), "redis.tls_ca_file: holds no PEM"),
            (files("", empty, ""), "redis.tls_cert_file: set with"),
            (files("", empty, empty), "redis.tls_cert_file: holds no PEM"),
        ] {
            let err = files.read().unwrap_err();
            assert!(err.starts_with(named), "{err}");
        }
        let none = files("", "", "").read().unwrap();
        assert!(none.ca.is_none() && none.identity.is_none());
    }
}
