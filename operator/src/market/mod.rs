//! The pool market. Pure decisions (`policy`, `bidengine`, `selection`,
//! `renter`) are apart from the I/O that carries them out (`node`).

pub mod bidengine;
pub mod heard;
pub mod lease_records;
pub mod node;
pub mod peer_writes;
pub mod policy;
pub mod provider_io;
pub mod renter;
pub mod renter_io;
pub mod selection;
