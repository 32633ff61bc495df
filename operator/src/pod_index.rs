//! Which of the operator's pods belong to which AiJob, kept beside the pod
//! cache. Every reconcile mirrors its Job's pods; finding them by walking
//! every cached pod cost each reconcile O(pods), and with 10,000 running
//! jobs looked at again every few minutes that walk was most of the
//! operator's CPU while nothing changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use gpupool_crds::LABEL_AIJOB;
use gpupool_crds::pods::PodView;
use kube::runtime::watcher::Event;

/// (namespace, name)
type Key = (String, String);

#[derive(Default)]
struct State {
    /// (namespace, AiJob) to its pods' names.
    pods: HashMap<Key, BTreeSet<String>>,
    /// (namespace, pod) to its AiJob, so a delete or a relabel finds the entry.
    owner: HashMap<Key, String>,
    /// A relist in progress: replaces the index when it is done, as the
    /// reflector's store does, so pods deleted while the watch was down go.
    relist: Option<Box<State>>,
}

impl State {
    fn insert(&mut self, pod: &PodView) {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            return;
        };
        let key = (ns.clone(), name.clone());
        self.remove(&key);
        let Some(aijob) = pod.metadata.labels.as_ref().and_then(|l| l.get(LABEL_AIJOB)) else {
            return;
        };
        self.pods
            .entry((ns.clone(), aijob.clone()))
            .or_default()
            .insert(name.clone());
        self.owner.insert(key, aijob.clone());
    }

    fn remove(&mut self, key: &Key) {
        let Some(aijob) = self.owner.remove(key) else { return };
        let job_key = (key.0.clone(), aijob);
        if let Some(names) = self.pods.get_mut(&job_key) {
            names.remove(&key.1);
            if names.is_empty() {
                self.pods.remove(&job_key);
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct PodIndex(Arc<RwLock<State>>);

impl PodIndex {
    /// Follows the watch that feeds the pod cache.
    pub fn apply(&self, event: &Event<PodView>) {
        // Poisoned only by a panic inside these few map operations; the maps
        // are still whole, at worst one pod behind, and the next event fixes it.
        let mut st = self.0.write().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Apply(p) => st.insert(p),
            Event::Delete(p) => {
                if let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) {
                    st.remove(&(ns.clone(), name.clone()));
                }
            }
            Event::Init => st.relist = Some(Box::default()),
            Event::InitApply(p) => st.relist.get_or_insert_with(Box::default).insert(p),
            Event::InitDone => {
                if let Some(fresh) = st.relist.take() {
                    *st = *fresh;
                }
            }
        }
    }

    /// Names of the pods labelled for AiJob `ns/aijob`.
    pub fn pods_of(&self, ns: &str, aijob: &str) -> Vec<String> {
        let st = self.0.read().unwrap_or_else(|e| e.into_inner());
        st.pods
            .get(&(ns.to_string(), aijob.to_string()))
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(ns: &str, name: &str, aijob: Option<&str>) -> PodView {
        PodView {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: aijob.map(|a| [(LABEL_AIJOB.to_string(), a.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn follows_applies_deletes_and_relists() {
        let idx = PodIndex::default();
        idx.apply(&Event::Apply(pod("ml", "train-a", Some("train"))));
        idx.apply(&Event::Apply(pod("ml", "train-b", Some("train"))));
        idx.apply(&Event::Apply(pod("other", "train-c", Some("train"))));
        idx.apply(&Event::Apply(pod("ml", "stray", None)));
        assert_eq!(idx.pods_of("ml", "train"), ["train-a", "train-b"]);
        assert_eq!(idx.pods_of("other", "train"), ["train-c"], "namespaces apart");

        idx.apply(&Event::Delete(pod("ml", "train-a", Some("train"))));
        assert_eq!(idx.pods_of("ml", "train"), ["train-b"]);
        idx.apply(&Event::Apply(pod("ml", "train-b", Some("eval"))));
        assert!(idx.pods_of("ml", "train").is_empty(), "a relabelled pod moves");
        assert_eq!(idx.pods_of("ml", "eval"), ["train-b"]);

        // A relist replaces everything once it is done, not before.
        idx.apply(&Event::Init);
        idx.apply(&Event::InitApply(pod("ml", "train-d", Some("train"))));
        assert_eq!(idx.pods_of("ml", "eval"), ["train-b"]);
        idx.apply(&Event::InitDone);
        assert!(idx.pods_of("ml", "eval").is_empty());
        assert_eq!(idx.pods_of("ml", "train"), ["train-d"]);
        assert!(idx.pods_of("other", "train").is_empty());
    }
}
