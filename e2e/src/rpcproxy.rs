//! A loopback TCP proxy in front of a chain RPC that tests can break on purpose:
//! drop everything (an outage), or answer garbage. It can also cut the line right
//! after a transaction reaches the node, so the client never hears back.

use std::sync::{
    Arc,
    atomic::{AtomicU8, Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const PASS: u8 = 0;
const DOWN: u8 = 1;
const GARBAGE: u8 = 2;
/// Pass until a transaction goes through, then behave as DOWN.
const CUT_AFTER_SEND: u8 = 3;

pub struct RpcProxy {
    pub url: String,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl RpcProxy {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let upstream = upstream.trim_start_matches("http://").to_string();
        let mode = Arc::new(AtomicU8::new(PASS));
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream.clone(), m.clone()));
            }
        });
        Ok(Self { url, mode, task })
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
}

impl Drop for RpcProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, upstream: String, mode: Arc<AtomicU8>) {
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
