//! A loopback TCP proxy in front of a chain RPC that tests can break on purpose:
//! drop everything (an outage), or answer garbage. It can also cut the line right
//! after a transaction reaches the node, so the client never hears back, or
//! hold a gas estimate while the test changes the chain under it.

use std::sync::{
    Arc,
    atomic::{AtomicU8, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

const PASS: u8 = 0;
const DOWN: u8 = 1;
const GARBAGE: u8 = 2;
/// Pass until a transaction goes through, then behave as DOWN.
const CUT_AFTER_SEND: u8 = 3;
/// Pass until an `eth_estimateGas` comes, then hold it until `release`.
const HOLD_ESTIMATE: u8 = 4;
/// An estimate is being held.
const HOLDING: u8 = 5;

pub struct RpcProxy {
    pub url: String,
    mode: Arc<AtomicU8>,
    released: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl RpcProxy {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let upstream = upstream.trim_start_matches("http://").to_string();
        let mode = Arc::new(AtomicU8::new(PASS));
        let released = Arc::new(Notify::new());
        let (m, r) = (mode.clone(), released.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream.clone(), m.clone(), r.clone()));
            }
        });
        Ok(Self {
            url,
            mode,
            released,
            task,
        })
    }

    pub fn pass(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }
    pub fn down(&self) {
        self.mode.store(DOWN, Ordering::SeqCst);
    }
    pub fn garbage(&self) {
        self.mode.store(GARBAGE, Ordering::SeqCst);
    }
    /// The next `eth_sendRawTransaction` reaches the node; its answer, and
    /// everything after it, is lost until `pass`.
    pub fn cut_after_next_send(&self) {
        self.mode.store(CUT_AFTER_SEND, Ordering::SeqCst);
    }
    pub fn is_down(&self) -> bool {
        self.mode.load(Ordering::SeqCst) == DOWN
    }
    /// The next `eth_estimateGas` waits, unanswered, until `release`: the
    /// client has decided what to send and the chain can be changed
    /// before the node looks at it.
    pub fn hold_next_estimate(&self) {
        self.mode.store(HOLD_ESTIMATE, Ordering::SeqCst);
    }
    pub fn is_holding(&self) -> bool {
        self.mode.load(Ordering::SeqCst) == HOLDING
    }
    /// Lets a held estimate on to the node, and everything after it.
    pub fn release(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
        self.released.notify_one();
    }
}

impl Drop for RpcProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, upstream: String, mode: Arc<AtomicU8>, released: Arc<Notify>) {
    match mode.load(Ordering::SeqCst) {
        DOWN => return,
        GARBAGE => {
            let mut buf = [0u8; 65536];
            let _ = client.read(&mut buf).await;
            let body = "<html>502 Bad Gateway</html>";
            let _ = client
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            return;
        }
        _ => {}
    }
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let mut from_client = vec![0u8; 1 << 20];
    let mut from_server = vec![0u8; 1 << 20];
    loop {
        tokio::select! {
            n = client.read(&mut from_client) => {
                let Ok(n) = n else { return };
                if n == 0 || mode.load(Ordering::SeqCst) == DOWN { return }
                let chunk = &from_client[..n];
                let is_send = chunk.windows(22).any(|w| w == b"eth_sendRawTransaction");
                let is_estimate = chunk.windows(15).any(|w| w == b"eth_estimateGas");
                if is_estimate
                    && mode
                        .compare_exchange(HOLD_ESTIMATE, HOLDING, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    released.notified().await;
                }
                if server.write_all(chunk).await.is_err() { return }
                if is_send && mode.load(Ordering::SeqCst) == CUT_AFTER_SEND {
                    // Give the node a moment to take it, then lose the answer.
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    mode.store(DOWN, Ordering::SeqCst);
                    return;
                }
            }
            n = server.read(&mut from_server) => {
                let Ok(n) = n else { return };
                if n == 0 || mode.load(Ordering::SeqCst) == DOWN { return }
                if client.write_all(&from_server[..n]).await.is_err() { return }
            }
        }
    }
}
