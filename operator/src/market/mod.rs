//! The pool market. Pure decisions (`policy`, `bidengine`, `selection`,
//! `renter`, `renter_says`, `renter_lease`, `renter_funds`, `lease_check`, `lease_objects`,
//! `peer_writes`, `heard`) are apart from the I/O that carries them out: `node` (the
//! message loop) with `peers` and `supply`; `provider_io`; and the renter's
//! `renter_io` with the steps it takes (`renter_orders`, `renter_bids`,
//! `renter_award`, `renter_reports`).

pub mod bidengine;
pub mod heard;
pub mod lease_check;
pub mod lease_objects;
pub mod lease_records;
pub mod node;
pub mod peer_writes;
pub mod peers;
pub mod policy;
pub mod provider_io;
pub mod renter;
pub mod renter_award;
pub mod renter_bids;
pub mod renter_funds;
pub mod renter_io;
pub mod renter_lease;
pub mod renter_orders;
pub mod renter_reports;
pub mod renter_says;
pub mod selection;
pub mod supply;
