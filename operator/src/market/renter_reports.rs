//! What the renter hears from its providers: lease status and heartbeats,
//! kept in memory and written to the renter Lease at a bounded rate.

use std::str::FromStr;

use gpupool_crds::{LABEL_ORDER, Lease, LeaseSide, LeaseState, WorkloadReport};
use gpupool_proto::peer::v1::LeaseStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use libp2p::PeerId;
use tracing::debug;

use super::node::{MARKET_MANAGER, Market, RenterLease, now_ms};
use super::renter::moves_forward;
use super::renter_io::lease_state;
use crate::p2p::envelope::DropReason;

type Handled = Result<(), (DropReason, String)>;

impl Market {
    /// When the provider of lease `l` was last heard from, per memory.
    pub(super) fn heard_ms(&self, l: &Lease) -> Option<u64> {
        let id = l.status.as_ref()?.lease_id.as_ref()?.to_ascii_lowercase();
        self.lock().heard.get(&id).map(|h| h.heard_ms.max(h.offered_ms))
    }

    async fn renter_lease(&self, lease_id: &str) -> Option<RenterLease> {
        if let Some(l) = self.lock().renter_leases.get(lease_id) {
            return Some(l.clone());
        }
        // After a restart, or before this job's next step registered it:
        // find it among the renter Leases. Without the watch cache, at most
        // every few seconds, so bogus lease ids cannot become API calls.
        let leases: Vec<Lease> = match self.ready_lease_cache() {
            Some(cache) => cache
                .find(|l| {
                    l.status
                        .as_ref()
                        .and_then(|s| s.lease_id.as_deref())
                        .is_some_and(|id| id.eq_ignore_ascii_case(lease_id))
                })
                .map(|l| vec![(*l).clone()])
                .unwrap_or_default(),
            None => {
                {
                    let mut st = self.lock();
                    let now = now_ms();
                    if now.saturating_sub(st.lease_refresh_ms) < 3_000 {
                        return None;
                    }
                    st.lease_refresh_ms = now;
                }
                let api: Api<Lease> = Api::all(self.client.clone());
                api.list(&ListParams::default().labels(LABEL_ORDER)).await.ok()?.items
            }
        };
        for l in leases {
            if let Some((id, rl)) = renter_lease_of(&l).filter(|(id, _)| *id == lease_id) {
                self.lock().renter_leases.insert(id, rl);
            }
        }
        self.lock().renter_leases.get(lease_id).cloned()
    }

    pub(crate) async fn on_lease_status(
        &self,
        sender: PeerId,
        s: Option<LeaseStatus>,
        lease_id: &str,
        expires_at_ms: u64,
    ) -> Handled {
        let lease_id = lease_id.to_ascii_lowercase();
        let Some(rl) = self.renter_lease(&lease_id).await else {
            // Providers report until they see the close on chain, so status for
            // a lease whose record is gone is normal for a while.
            return Err((DropReason::Late, format!("status for unknown lease {lease_id}")));
        };
        if rl.provider != sender {
            return Err((
                DropReason::WrongSender,
                "status from a peer that is not the lease's provider".into(),
            ));
        }
        let now = now_ms();
        // The beat itself lives in memory; the Lease keeps one for people
        // (a restart starts its own grace window).
        let write_every =
            super::heard::record_every_ms(u64::try_from(self.settings.heartbeat_grace.as_millis()).unwrap_or(u64::MAX));
        // A lease whose close the renter asked for, or that is gone: its
        // provider's beats are not worth a write any more (see `heard`).
        let closing = self.ready_lease_cache().is_some_and(|c| {
            c.get(&ObjectRef::new(&rl.name).within(&rl.namespace))
                .is_none_or(|l| l.spec.close_reason.is_some() || lease_state(&l) == Some(LeaseState::Closed))
        });
        let (write, changed) = {
            let mut st = self.lock();
            if st.heard.len() > 10_000 {
                st.heard
                    .retain(|_, h| now.saturating_sub(h.heard_ms.max(h.offered_ms)) < 600_000);
                let live: std::collections::HashSet<String> = st.heard.keys().cloned().collect();
                st.status_writes.retain(|k, _| live.contains(k));
            }
            let h = st.heard.entry(lease_id.clone()).or_default();
            let changed = h.absorb(now, s, expires_at_ms);
            let write = h.write_due(now, write_every, closing);
            if write {
                h.writing(now);
            }
            (write, changed)
        };
        // The AiJob mirrors the heard report (see `with_heard_workload`), so
        // it need not wait for this write.
        if changed {
            self.wake(ObjectRef::new(&rl.aijob).within(&rl.namespace)).await;
        }
        if !write {
            return Ok(());
        }
        // One write at a time per lease, each carrying the newest report in
        // memory: concurrent writes could land out of order, and one without
        // the report would drop it (server-side apply removes what a manager
        // stops sending).
        let gate = self.lock().status_writes.entry(lease_id.clone()).or_default().clone();
        let _turn = gate.lock().await;
        let report = self.lock().heard.get(&lease_id).and_then(|h| h.report.clone());
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &rl.namespace);
        let mut patch = serde_json::json!({
            "apiVersion": "gpupool.dev/v1alpha1",
            "kind": "Lease",
            "status": {"lastHeartbeat": Time(Timestamp::now())},
        });
        if let Some(s) = &report {
            patch["status"]["workload"] = serde_json::to_value(workload_report(s)).unwrap_or_default();
        }
        if let Err(e) = api
            .patch_status(
                &rl.name,
                &PatchParams::apply(MARKET_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            debug!(error = %e, "could not record lease status");
            if let Some(h) = self.lock().heard.get_mut(&lease_id) {
                h.write_failed();
            }
        }
        Ok(())
    }

    /// The Lease with the newest workload report known: the one it records,
    /// or the one heard since, which the Lease gets with a later write or
    /// the watch has not brought back yet. Mirroring only what came back
    /// through the watch put seconds between a provider's report and the
    /// AiJob under load; a report only replaces one it does not go back from.
    pub(super) fn with_heard_workload(&self, mut l: Lease) -> Lease {
        let Some(id) = l.status.as_ref().and_then(|s| s.lease_id.as_deref()) else {
            return l;
        };
        let heard = self
            .lock()
            .heard
            .get(&id.to_ascii_lowercase())
            .and_then(|h| h.report.as_ref().map(workload_report));
        if let (Some(heard), Some(status)) = (heard, l.status.as_mut())
            && moves_forward(status.workload.as_ref().map(|w| w.phase.as_str()), &heard.phase)
        {
            status.workload = Some(heard);
        }
        l
    }

    /// The Lease with the close asked for here, while the cache lags the
    /// patch that asked.
    pub(super) fn with_close_asked(&self, mut l: Lease) -> Lease {
        let uid = l.metadata.uid.clone().unwrap_or_default();
        l.spec.close_reason = self.lock().closes_asked.plan_with(&uid, l.spec.close_reason);
        l
    }
}

/// Where a provider's reports about renter Lease `l` go: its on-chain id
/// (lower case, as reports are matched) and the job and provider it is for.
/// None for a provider's copy, or a lease not yet open on chain.
pub(super) fn renter_lease_of(l: &Lease) -> Option<(String, RenterLease)> {
    if l.spec.side != LeaseSide::Renter {
        return None;
    }
    let id = l.status.as_ref()?.lease_id.as_deref()?.to_ascii_lowercase();
    let provider = PeerId::from_str(l.spec.provider.peer_id.as_deref()?).ok()?;
    Some((
        id,
        RenterLease {
            namespace: l.namespace()?,
            name: l.name_any(),
            aijob: l.spec.ai_job.clone().unwrap_or_default(),
            provider,
        },
    ))
}

/// A provider's report as the renter's Lease records it. The provider puts
/// the lease namespace in front of its message (`namespace: message`).
fn workload_report(s: &LeaseStatus) -> WorkloadReport {
    WorkloadReport {
        phase: s.phase.clone(),
        pod_state: s.pod_state.clone(),
        exit_code: s.exit_code,
        message: s
            .message
            .split_once(": ")
            .map(|(_, m)| m.to_string())
            .unwrap_or_default(),
        namespace: s
            .message
            .split_once(':')
            .map(|(n, _)| n.to_string())
            .unwrap_or_default(),
    }
}
