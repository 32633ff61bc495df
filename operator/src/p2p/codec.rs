//! Request-response framing for direct peer messages: a 4-byte big-endian
//! length and the bytes of one SignedEnvelope. The length is checked before
//! anything is allocated, so an oversized message costs the sender a refused
//! stream, not us memory.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use gpupool_proto::MAX_MESSAGE_BYTES;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/gpupool/direct/1.0.0");

/// What the receiver answers: it took the message for processing, or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    Taken,
    Busy,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct EnvelopeCodec;

const OVERSIZED: &str = "gpupool: message larger than MAX_MESSAGE_BYTES";

/// One inbound request. An oversized one is reported, not read: libp2p does
/// not surface a failed read to the application, and the drop must be counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Vec<u8>),
    Oversized(usize),
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Ok(Frame::Oversized(len));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(Frame::Message(buf))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, OVERSIZED))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl Codec for EnvelopeCodec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Ack;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Ack>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        Ok(if b[0] == 1 { Ack::Taken } else { Ack::Busy })
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Frame) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Frame::Message(bytes) => write_frame(io, &bytes).await,
            Frame::Oversized(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, OVERSIZED)),
        }
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Ack) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&[u8::from(res == Ack::Taken)]).await?;
        io.close().await
    }
}
