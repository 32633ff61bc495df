//! The agent's loop: read, report on change or heartbeat, back off on errors.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpupool_crds::GpuNodeStatus;
use gpupool_crds::pods::PodView;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::publish::Publisher;
use crate::report::{meaningful_change, node_labels, status_from_error, status_from_reading};
use crate::source::GpuSource;

#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    /// How often GPUs are read.
    pub poll: Duration,
    /// The longest the GpuNode goes unwritten, so readers can tell a live
    /// agent from a dead one.
    pub heartbeat: Duration,
    /// The longest wait between retries after an error.
    pub max_backoff: Duration,
}

/// GPUs claimed by live pods on this node, from a watch on just its pods.
fn allocated(store: &Store<PodView>) -> u32 {
    store.state().iter().filter(|p| p.is_live()).map(|p| p.gpus).sum()
}

/// Runs until the process is stopped. Errors from the GPUs or the API never
/// end it: they are reported and retried with backoff.
pub async fn run(client: Client, mut source: Box<dyn GpuSource>, settings: Settings) {
    let publisher = Publisher::new(client.clone(), &settings.node);
    let pods: Api<PodView> = Api::all(client);
    let (store, writer) = reflector::store();
    let stream = watcher(
        pods,
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node)),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|_| futures::future::ready(()));
    tokio::spawn(stream);

    let mut last: Option<GpuNodeStatus> = None;
    let mut last_write = Instant::now();
    let mut last_labels: Option<BTreeMap<String, String>> = None;
    let mut backoff = settings.poll;
    loop {
        let now = Timestamp::now();
        let reading = source.read();
        let (status, labels) = match &reading {
            Ok(r) => {
                backoff = settings.poll;
                (
                    status_from_reading(source.name(), r, allocated(&store), last.as_ref(), now),
                    Some(node_labels(r)),
                )
            }
            Err(e) => {
                warn!(node = %settings.node, error = %e, retry_in = ?backoff, "cannot read GPUs");
                (status_from_error(source.name(), e, last.as_ref(), now), None)
            }
        };
        let due = last_write.elapsed() >= settings.heartbeat;
        let changed = last.as_ref().is_none_or(|prev| meaningful_change(prev, &status));
        let mut api_ok = true;
        if changed || due {
            match publisher.gpunode(&status).await {
                Ok(()) => {
                    if changed {
                        info!(node = %settings.node, gpus = status.gpus_total, free = status.gpus_free, "GpuNode updated");
                    }
                    last = Some(status);
                    last_write = Instant::now();
                }
                Err(e) => {
                    api_ok = false;
                    warn!(node = %settings.node, error = %e, "writing GpuNode failed; will retry");
                }
            }
        }
        if let Some(labels) = labels
            && last_labels.as_ref() != Some(&labels)
        {
            match publisher.labels(&labels).await {
                Ok(()) => last_labels = Some(labels),
                Err(e) => {
                    api_ok = false;
                    warn!(node = %settings.node, error = %e, "labelling Node failed; will retry");
                }
            }
        }
        let wait = if reading.is_err() || !api_ok {
            let w = backoff;
            backoff = (backoff * 2).min(settings.max_backoff);
            w
        } else {
            settings.poll
        };
        tokio::time::sleep(wait).await;
    }
}
