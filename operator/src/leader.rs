//! Leader election on a `coordination.k8s.io/v1` Lease, so a data centre
//! can run the operator with more than one replica (or roll it out) without
//! two processes placing the same job, opening the same lease on chain, or
//! speaking for the organisation with the same libp2p identity.
//!
//! The rules are client-go's: a holder renews the Lease well within its
//! duration; another candidate takes it over only once it has seen the
//! Lease's record unchanged for a whole duration by its own clock (so clock
//! skew between nodes does not matter), with optimistic concurrency (the
//! resourceVersion) deciding between candidates that try at once. A holder
//! that cannot renew in time stops acting: the process exits and its
//! Deployment restarts it as a candidate. kube-runtime 5.0 has no elector.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// How long a holder's claim lasts without a renewal, and how often it
/// renews and others check: client-go's defaults (15 s, 10 s deadline, 2 s).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate does next, given the Lease as it stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet: create it, held by us.
    Create,
    /// Ours (or released, or expired): write it as ours.
    Claim { transition: bool },
    /// Someone else holds it for at least `remaining` more.
    Wait { holder: String, remaining: Duration },
}

/// The decision, from the Lease's spec and how long this candidate has seen
/// its record (holder and renewal) unchanged.
pub fn next_step(lease: Option<&LeaseSpec>, me: &str, unchanged_for: Duration, default_duration: Duration) -> Step {
    let Some(spec) = lease else { return Step::Create };
    match spec.holder_identity.clone().filter(|h| !h.is_empty()) {
        None => Step::Claim { transition: true },
        Some(h) if h == me => Step::Claim { transition: false },
        Some(h) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(default_duration, Duration::from_secs);
            match duration.checked_sub(unchanged_for).filter(|r| !r.is_zero()) {
                Some(remaining) => Step::Wait { holder: h, remaining },
                None => Step::Claim { transition: true },
            }
        }
    }
}

/// The part of a Lease whose change shows its holder is alive.
fn record(spec: Option<&LeaseSpec>) -> String {
    spec.map_or_else(String::new, |s| {
        format!(
            "{}@{}",
            s.holder_identity.as_deref().unwrap_or_default(),
            s.renew_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
        )
    })
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading or writing the leader Lease: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API server did not answer within {0}s")]
    NoAnswer(u64),
    #[error("leadership lost: {0}")]
    Lost(String),
}

/// One candidate for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    me: String,
    timing: Timing,
    /// The Lease's record as last seen, and since when (our clock).
    observed: std::sync::Mutex<(String, tokio::time::Instant)>,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, me: &str, timing: Timing) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            me: me.to_string(),
            timing,
            observed: std::sync::Mutex::new((String::new(), tokio::time::Instant::now())),
        }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// One try: Ok(true) when we hold the Lease after it, Ok(false) when
    /// someone else does (or won a race to write it).
    async fn try_hold(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        // A Lease without a spec (written by hand, say) is there but held by
        // no one: claimed with a replace, where a create would only conflict.
        let unheld = LeaseSpec::default();
        let spec = current.as_ref().map(|l| l.spec.as_ref().unwrap_or(&unheld));
        let unchanged_for = {
            let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            let r = record(spec);
            if seen.0 != r {
                *seen = (r, tokio::time::Instant::now());
            }
            seen.1.elapsed()
        };
        let step = next_step(spec, &self.me, unchanged_for, self.timing.lease_duration);
        let written = match (step, current) {
            (Step::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.me.clone()),
                        lease_duration_seconds: Some(self.duration_secs()),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Step::Claim { transition }, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if transition {
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                    info!(lease = %self.name, previous = ?spec.holder_identity, "taking over the leader Lease");
                }
                spec.holder_identity = Some(self.me.clone());
                spec.lease_duration_seconds = Some(self.duration_secs());
                spec.renew_time = Some(MicroTime(now));
                // Replace carries the resourceVersion read above: of two
                // candidates writing at once, one gets 409 Conflict.
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
            (Step::Claim { .. }, None) => return Ok(false),
            (Step::Wait { .. }, _) => return Ok(false),
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        let mut said = false;
        loop {
            // A try that hangs is given up after a lease duration and tried again.
            let tried = tokio::time::timeout(self.timing.lease_duration, self.try_hold())
                .await
                .unwrap_or_else(|_| Err(LeaderError::NoAnswer(self.timing.lease_duration.as_secs())));
            match tried {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.me, "leading");
                    return Ok(());
                }
                Ok(false) => {
                    if !said {
                        info!(lease = %self.name, identity = %self.me, "another replica leads; standing by");
                        said = true;
                    }
                }
                // The API server may be briefly away; a candidate just retries.
                Err(e) => warn!(lease = %self.name, error = %e, "could not read or claim the leader Lease"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the Lease for as long as it can; returns why it stopped. A
    /// holder that has not renewed within the renew deadline may already
    /// have been replaced, so it must stop acting at once.
    pub async fn hold(&self) -> LeaderError {
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            // A renewal that hangs (an API server that accepts the connection
            // and never answers) must not outlast the deadline either.
            let left = self.timing.renew_deadline.saturating_sub(renewed.elapsed());
            let Ok(tried) = tokio::time::timeout(left, self.try_hold()).await else {
                return LeaderError::Lost(LeaderError::NoAnswer(self.timing.renew_deadline.as_secs()).to_string());
            };
            match tried {
                Ok(true) => renewed = tokio::time::Instant::now(),
                Ok(false) => return LeaderError::Lost("another replica holds the leader Lease".into()),
                Err(e) => {
                    warn!(lease = %self.name, error = %e, "could not renew the leader Lease");
                    if renewed.elapsed() >= self.timing.renew_deadline {
                        return LeaderError::Lost(format!(
                            "not renewed for {}s: {e}",
                            self.timing.renew_deadline.as_secs()
                        ));
                    }
                }
            }
        }
    }

    /// Gives the Lease up on a clean shutdown, so a standby takes over at
    /// once rather than after a whole lease duration.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => info!(lease = %self.name, "leader Lease released"),
            Err(e) => warn!(lease = %self.name, error = %e, "could not release the leader Lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(1_800_000_000).unwrap())),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn no_lease_is_created_and_our_own_is_renewed() {
        assert_eq!(next_step(None, "a", secs(0), D), Step::Create);
        assert_eq!(
            next_step(Some(&held("a", 15)), "a", secs(100), D),
            Step::Claim { transition: false },
            "ours, even late: renewing it is how we keep it"
        );
    }

    #[test]
    fn another_holder_is_waited_for_until_its_record_stood_still_a_whole_duration() {
        assert_eq!(
            next_step(Some(&held("b", 15)), "a", secs(14), D),
            Step::Wait {
                holder: "b".into(),
                remaining: secs(1)
            }
        );
        assert_eq!(
            next_step(Some(&held("b", 15)), "a", secs(15), D),
            Step::Claim { transition: true }
        );
        // The Lease's own duration counts, not ours.
        assert!(matches!(
            next_step(Some(&held("b", 60)), "a", secs(30), D),
            Step::Wait { .. }
        ));
        let no_duration = LeaseSpec {
            lease_duration_seconds: None,
            ..held("b", 60)
        };
        assert!(matches!(
            next_step(Some(&no_duration), "a", secs(15), D),
            Step::Claim { .. }
        ));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let released = LeaseSpec {
            holder_identity: None,
            ..held("b", 15)
        };
        assert_eq!(
            next_step(Some(&released), "a", secs(0), D),
            Step::Claim { transition: true }
        );
        let empty = LeaseSpec {
            holder_identity: Some(String::new()),
            ..held("b", 15)
        };
        assert_eq!(
            next_step(Some(&empty), "a", secs(0), D),
            Step::Claim { transition: true }
        );
    }

    /// A real socket that accepts connections and never answers, as a
    /// wedged API server would: the leader must give up within its deadline
    /// rather than act on a claim it cannot prove.
    #[tokio::test]
    async fn a_leader_whose_renewals_hang_gives_up_within_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                open.push(conn);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let timing = Timing {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_millis(800),
            retry_period: Duration::from_millis(100),
        };
        let e = Elector::new(client, "gpupool-system", "gpupool-operator", "me", timing);
        let started = std::time::Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(5), e.hold())
            .await
            .expect("hold() gave up by itself");
        assert!(
            matches!(why, LeaderError::Lost(ref m) if m.contains("did not answer")),
            "{why}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        held.abort();
    }

    #[test]
    fn a_renewal_or_a_new_holder_changes_the_record() {
        let a = held("b", 15);
        let renewed = LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::from_second(1_800_000_002).unwrap())),
            ..a.clone()
        };
        assert_ne!(record(Some(&a)), record(Some(&renewed)));
        assert_ne!(record(Some(&a)), record(Some(&held("c", 15))));
        assert_eq!(record(Some(&a)), record(Some(&a.clone())));
    }
}
