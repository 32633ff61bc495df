//! The peer-to-peer layer: identity, message sealing and checks (pure), peer
//! scores (pure), which connections to close around a hole punch (pure),
//! when a message is sent again (pure) and the libp2p swarm with its event
//! loop (I/O).

pub mod announce;
pub mod body;
pub mod codec;
pub mod envelope;
mod event_loop;
pub mod identity;
pub mod links;
#[cfg(test)]
mod property_tests;
pub mod resend;
pub mod score;
pub mod swarm;
