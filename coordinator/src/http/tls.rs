//! TLS for the API (`serve --tls-cert/--tls-key`), with rustls.
//!
//! The certificate is re-read when its files change (checked every `RELOAD_EVERY`), so a
//! certificate rotated in place (cert-manager renewing a mounted Secret) is served to new
//! connections without a restart; a pair that fails to load is logged and the previous one
//! stays in use.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};
use tokio_rustls::{
    rustls::{
        self,
        crypto::ring,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
        ServerConfig,
    },
    TlsAcceptor,
};

const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Errors loading the API's certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("the key {key} does not fit the certificate {cert}: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The API's TLS settings: an acceptor per connection over a certificate that follows its files.
#[derive(Clone)]
pub struct ApiTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").finish_non_exhaustive()
    }
}

impl ApiTls {
    /// Loads `cert` (a PEM chain, leaf first) and `key` (PEM, PKCS#8, PKCS#1 or SEC1) and
    /// checks that they belong together. Call inside a Tokio runtime: it starts the task that
    /// follows the files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let current = Arc::new(Reloading {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            stamp: RwLock::new(stamp(cert, key)),
            current: RwLock::new(Arc::new(certified_key(cert, key)?)),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Pair {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let weak = Arc::downgrade(&current);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(r) = weak.upgrade() else { return };
                r.reload_if_changed();
            }
        });
        Ok(Self {
            config: Arc::new(config),
        })
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}

/// The served certificate and the files it came from.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    /// Modification times of (cert, key) when last loaded.
    stamp: RwLock<Option<(SystemTime, SystemTime)>>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Reloading {
    fn reload_if_changed(&self) {
        let now = stamp(&self.cert, &self.key);
        if now.is_none() || *self.stamp.read().unwrap_or_else(|e| e.into_inner()) == now {
            return;
        }
        match certified_key(&self.cert, &self.key) {
            Ok(k) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
                *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
                tracing::info!(cert = %self.cert.display(), "reloaded the API's TLS certificate");
            }
            // A rotation caught between writing the two files fails once and loads next time.
            Err(e) => {
                tracing::warn!(error = %e, "the API's TLS certificate changed but does not load; serving the previous one")
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let pem_err = |p: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: p.to_path_buf(),
        what: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| pem_err(key, e))?;
    let pair = |source| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let ck = CertifiedKey::from_der(chain, private, &ring::default_provider()).map_err(pair)?;
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_files_get_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let missing = certified_key(&c, &k).unwrap_err();
        assert!(matches!(missing, TlsError::Read { .. }), "{missing}");
        std::fs::write(&c, "not a certificate").unwrap();
        std::fs::write(&k, "not a key").unwrap();
        let empty = certified_key(&c, &k).unwrap_err();
        assert!(matches!(empty, TlsError::NoCertificate { .. }), "{empty}");
        std::fs::write(
            &c,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let no_key = certified_key(&c, &k).unwrap_err();
        assert!(matches!(no_key, TlsError::Pem { .. }), "{no_key}");
        assert!(no_key.to_string().contains("k.pem"), "{no_key}");
    }
}
