//! The Pool API (gRPC): renters without a cluster of their own submit, watch,
//! accept and raise through a pool member's operator, signing each request
//! with the wallet whose escrow account pays.
//!
//! - [`replay`]: freshness and replay memory for signed requests (pure).
//! - [`views`]: the renter's namespace and the messages resources become (pure).
//! - [`service`]: the gRPC service, the I/O edge.

pub mod replay;
pub mod service;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use gpupool_chain::{Address, EscrowClient};
use gpupool_proto::pool::v1::pool_server::PoolServer;
use tonic::transport::{Identity, ServerTlsConfig};
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
    Tls(#[from] tonic::transport::Error),
}

/// The Pool API's serving certificate chain and key, PEM files (a
/// kubernetes.io/tls Secret's tls.crt and tls.key). Read once at start: a
/// rotated certificate takes a rollout.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    fn identity(&self) -> Result<Identity, ServeError> {
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| ServeError::TlsFile {
                what,
                path: path.clone(),
                source,
            })
        };
        Ok(Identity::from_pem(
            read("certificate", &self.cert)?,
            read("key", &self.key)?,
        ))
    }
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
    let mut server = tonic::transport::Server::builder();
    if let Some(files) = &tls {
        server = server.tls_config(ServerTlsConfig::new().identity(files.identity()?))?;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let service = PoolServer::new(service::PoolService::new(client, chain, agent, org, metrics))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        if let Err(e) = server.add_service(service).serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "the Pool API stopped");
        }
    });
    info!(addr = %bound, tls = tls.is_some(), "serving the Pool API (gRPC)");
    Ok(bound)
}
