//! The Pool API (gRPC): renters without a cluster of their own submit, watch,
//! accept and raise through a pool member's operator, signing each request
//! with the wallet whose escrow account pays.
//!
//! - [`replay`]: freshness and replay memory for signed requests (pure).
//! - [`views`]: the renter's namespace and the messages resources become (pure).
//! - [`service`]: the gRPC service, the I/O edge.
//! - [`tls`]: the serving certificate, reloaded when its files change.

pub mod replay;
pub mod service;
pub mod tls;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use gpupool_chain::{Address, EscrowClient};
use gpupool_proto::pool::v1::pool_server::PoolServer;
use tracing::info;

use crate::telemetry::Metrics;

/// The largest request the Pool API decodes: a job's spec with its pod
/// template fits many times over, and a flood of them cannot exhaust memory.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

#[derive(thiserror::Error, Debug)]
pub enum ServeError {
    #[error("binding the Pool API address {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("reading the Pool API's TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Pool API's TLS certificate and key are not usable: {0}")]
    TlsPair(String),
}

/// The Pool API's serving certificate chain and key, PEM files (a
/// kubernetes.io/tls Secret's tls.crt and tls.key). Read again whenever they
/// change (`tls::ReloadingCert`), so a renewed certificate needs no rollout.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Binds `addr` and serves the Pool API in the background, over TLS when
/// `tls` names a certificate; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    tls: Option<TlsFiles>,
    client: kube::Client,
    chain: EscrowClient,
    agent: Address,
    org: String,
    metrics: Arc<Metrics>,
) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let service = PoolServer::new(service::PoolService::new(client, chain, agent, org, metrics))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = tonic::transport::Server::builder().add_service(service);
    match &tls {
        Some(files) => {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let cert = Arc::new(tls::ReloadingCert::load(files.clone(), provider.clone())?);
            cert.clone().watch();
            let incoming = tls::incoming(listener, cert, provider)?;
            tokio::spawn(async move {
                if let Err(e) = router.serve_with_incoming(incoming).await {
                    tracing::error!(error = %e, "the Pool API stopped");
                }
            });
        }
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            tokio::spawn(async move {
                if let Err(e) = router.serve_with_incoming(incoming).await {
                    tracing::error!(error = %e, "the Pool API stopped");
                }
            });
        }
    }
    info!(addr = %bound, tls = tls.is_some(), "serving the Pool API (gRPC)");
    Ok(bound)
}
