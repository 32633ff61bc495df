//! gpupool operator. Pure decisions (capacity, matching, placement, Job
//! building, status planning) live apart from the I/O in `controller`, so they
//! are unit-tested without any server.

pub mod cache;
pub mod capacity;
pub mod chain_watch;
pub mod controller;
pub mod deletes;
pub mod events;
pub mod finalizers;
pub mod jobbuild;
pub mod jobstatus;
pub mod leader;
pub mod lease_gauges;
pub mod listed;
pub mod market;
pub mod matching;
pub mod otlp_metrics;
pub mod p2p;
pub mod payer;
pub mod placement;
pub mod pod_index;
pub mod pool_api;
pub mod promised;
pub mod quantity;
pub mod settlement;
pub mod settlement_plan;
pub mod ssa;
pub mod status;
pub mod status_memo;
pub mod sweep;
pub mod telemetry;
#[cfg(test)]
mod telemetry_queries;
#[cfg(test)]
mod test_fixtures;
pub mod tracecontext;
pub mod traces;
pub mod triggers;
