//! The Pool API's TLS: the serving certificate is read again whenever its
//! files change, so a renewed certificate (cert-manager rewriting the
//! Secret, the kubelet swapping the mounted files) is served without a
//! restart. A pair that does not parse, or whose key does not match its
//! certificate, is refused and the one in use stays.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::{ServeError, TlsFiles};

/// How often the files are compared with what is served. The kubelet
/// refreshes mounted Secrets within about a minute; this adds little to it.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// A TLS handshake that takes longer is dropped: a client that opens
/// connections and never finishes them holds nothing for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; more wait for the next accept.
const MAX_HANDSHAKES: usize = 1024;

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' bytes when they were loaded: a change is a difference.
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// The certificate the Pool API serves, kept current with its files.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::TlsFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificate chain and key in `cert_pem` and `key_pem`, checked to belong together.
fn certified(cert_pem: &[u8], key_pem: &[u8], provider: &CryptoProvider) -> Result<CertifiedKey, ServeError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::TlsPair(format!("the certificate file is not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(ServeError::TlsPair("the certificate file holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ServeError::TlsPair(format!("the key file is not a PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| ServeError::TlsPair(format!("the key does not go with the certificate: {e}")))
}

impl ReloadingCert {
    /// Loads the pair; fails when it is not usable, as starting without a
    /// certificate would serve nothing.
    pub fn load(files: TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, ServeError> {
        let loaded = Self::read_pair(&files, &provider)?;
        Ok(Self {
            files,
            provider,
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    fn read_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<Loaded, ServeError> {
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("key", &files.key)?;
        let key = Arc::new(certified(&cert_pem, &key_pem, provider)?);
        Ok(Loaded { key, cert_pem, key_pem })
    }

    fn loaded(&self) -> Arc<Loaded> {
        // A poisoned lock only means a panic mid-swap of an Arc; the value is whole.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the files again and serves them from now on if they changed
    /// and make a usable pair; returns whether they did. On an error the
    /// pair in use stays.
    pub fn refresh(&self) -> Result<bool, ServeError> {
        let cert_pem = read("certificate", &self.files.cert)?;
        let key_pem = read("key", &self.files.key)?;
        let now = self.loaded();
        if now.cert_pem == cert_pem && now.key_pem == key_pem {
            return Ok(false);
        }
        let key = Arc::new(certified(&cert_pem, &key_pem, &self.provider)?);
        let mut slot = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Arc::new(Loaded { key, cert_pem, key_pem });
        Ok(true)
    }

    /// Refreshes every `CHECK_EVERY` for the life of the process, saying
    /// once when a change is refused and when it is taken.
    pub fn watch(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                match self.refresh() {
                    Ok(true) => {
                        last_error.clear();
                        info!(cert = %self.files.cert.display(), "the Pool API serves a new certificate");
                    }
                    Ok(false) => last_error.clear(),
                    Err(e) => {
                        let e = e.to_string();
                        if e != last_error {
                            warn!(error = %e, "the Pool API's certificate files changed but are not usable; still serving the previous certificate");
                            last_error = e;
                        }
                    }
                }
            }
        });
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.loaded().key.clone())
    }
}

/// Accepts TCP connections on `listener` and completes their TLS
/// handshakes concurrently (a slow one holds up no other), with the
/// certificate `cert` holds at the time; yields the established streams.
pub fn incoming(
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
    provider: Arc<CryptoProvider>,
) -> Result<tokio_stream::wrappers::ReceiverStream<Result<TlsStream<tokio::net::TcpStream>, std::io::Error>>, ServeError>
{
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::TlsPair(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    // gRPC is HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: the next accept may work.
                    debug!(error = %e, "Pool API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, out) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = out.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "Pool API TLS handshake failed"),
                    Err(_) => debug!(%peer, "Pool API TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn served(c: &ReloadingCert) -> Vec<u8> {
        c.loaded().key.end_entity_cert().unwrap().to_vec()
    }

    #[test]
    fn a_renewed_certificate_is_served_and_a_broken_one_is_not() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let dir = std::env::temp_dir().join(format!("gpupool-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        let write = |(c, k): &(String, String)| {
            std::fs::write(&files.cert, c).unwrap();
            std::fs::write(&files.key, k).unwrap();
        };
        let first = pair("first.example");
        write(&first);
        let cert = ReloadingCert::load(files.clone(), provider).unwrap();
        let before = served(&cert);
        assert!(!cert.refresh().unwrap(), "unchanged files are not a change");

        let second = pair("second.example");
        write(&second);
        assert!(cert.refresh().unwrap());
        let after = served(&cert);
        assert_ne!(before, after, "the renewed certificate is served");

        // Half-written (a new certificate with the old key): refused, the one in use stays.
        let third = pair("third.example");
        std::fs::write(&files.cert, &third.0).unwrap();
        let e = cert.refresh().unwrap_err();
        assert!(e.to_string().contains("does not go with the certificate"), "{e}");
        assert_eq!(served(&cert), after);
        std::fs::write(&files.cert, "not pem").unwrap();
        assert!(cert.refresh().is_err());
        assert_eq!(served(&cert), after);
        // Completed: served.
        write(&third);
        assert!(cert.refresh().unwrap());
        assert_ne!(served(&cert), after);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
