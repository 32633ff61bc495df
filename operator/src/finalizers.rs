//! One finalizer per controller, added before the first apply and removed
//! after cleanup, as kube's `finalizer` helper does, but holding up when the
//! controller's cache lags its own writes.
//!
//! kube's helper builds its JSON Patch from the object it was handed: "the
//! finalizer list is still X, add ours" and "ours is still at index i,
//! remove it". A reconcile that runs on a cached copy older than the
//! controller's last write (another trigger came in before the watch
//! delivered that write; under a burst the API server's watch lags by
//! hundreds of milliseconds) fails that test: the API server answers 422,
//! the reconcile fails, a warning is logged, a reconcile error is counted
//! (what an SRE alerts on) and the job waits out the error backoff. A 100-job
//! burst measured 60 of them. A reconcile of a deleted object's stale copy
//! also tried to remove the finalizer again and got 404.
//!
//! Here a failed test means "our view is old": the object is read once from
//! the API server and the step is taken from what it holds (the finalizer
//! already there: go on to apply; ours moved: remove it where it is now).
//! An object already gone needs no finalizer removed. Anything else is
//! still an error, and one fresh read is all a step gets.

use std::{fmt::Debug, sync::Arc};

use futures::{TryFuture, TryFutureExt};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        finalizer::{Error, Event},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::debug;

/// The JSON Patch that adds `name` to an object whose finalizers are
/// `current`, failing (422) if they have changed since: finalizers are a
/// plain list the API server does not deduplicate.
pub fn add_ops(current: &[String], name: &str) -> Vec<serde_json::Value> {
    if current.is_empty() {
        vec![
            serde_json::json!({"op": "test", "path": "/metadata/finalizers", "value": null}),
            serde_json::json!({"op": "add", "path": "/metadata/finalizers", "value": [name]}),
        ]
    } else {
        vec![
            serde_json::json!({"op": "test", "path": "/metadata/finalizers", "value": current}),
            serde_json::json!({"op": "add", "path": "/metadata/finalizers/-", "value": name}),
        ]
    }
}

/// The JSON Patch that removes `name` from position `index`, failing (422)
/// if something else stands there now.
pub fn remove_ops(index: usize, name: &str) -> Vec<serde_json::Value> {
    let path = format!("/metadata/finalizers/{index}");
    vec![
        serde_json::json!({"op": "test", "path": path, "value": name}),
        serde_json::json!({"op": "remove", "path": path}),
    ]
}

/// A JSON Patch from ops built above.
pub fn json_patch(ops: Vec<serde_json::Value>) -> json_patch::Patch {
    // Proven invariant: `add_ops` and `remove_ops` build only well-formed
    // test, add and remove operations with string paths.
    serde_json::from_value(serde_json::Value::Array(ops)).expect("well-formed JSON Patch")
}

/// Whether the API server refused a patch because its test failed: our view
/// of the object was older than the object.
pub fn is_stale_view(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 422)
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn index_of<K: Resource>(obj: &K, name: &str) -> Option<usize> {
    obj.meta().finalizers.as_ref()?.iter().position(|f| f == name)
}

/// Runs `reconcile` for `obj` behind the finalizer `name`: `Apply` once the
/// finalizer is on the object, `Cleanup` once it is being deleted, then the
/// finalizer comes off. Same contract as kube's `finalizer`: both events
/// must be idempotent, and `Cleanup` must tolerate `Apply` never having run.
pub async fn finalizer<K, ReconcileFut>(
    api: &Api<K>,
    name: &str,
    obj: Arc<K>,
    reconcile: impl FnOnce(Event<K>) -> ReconcileFut,
) -> Result<Action, Error<ReconcileFut::Error>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    ReconcileFut: TryFuture<Ok = Action>,
    ReconcileFut::Error: std::error::Error + 'static,
{
    let obj = match (index_of(obj.as_ref(), name), obj.meta().deletion_timestamp.is_some()) {
        (Some(_), _) => obj,
        // Being deleted before we ever held it: nothing of ours to clean up.
        (None, true) => return Ok(Action::await_change()),
        (None, false) => match add(api, name, &obj).await? {
            // The write comes back through the watch and reconciles it.
            Added::Now | Added::Gone => return Ok(Action::await_change()),
            Added::Before(fresh) => fresh,
        },
    };
    let deleting = obj.meta().deletion_timestamp.is_some();
    if !deleting {
        return TryFutureExt::into_future(reconcile(Event::Apply(obj)))
            .await
            .map_err(Error::ApplyFailed);
    }
    let obj_name = obj.meta().name.clone().ok_or(Error::UnnamedObject)?;
    // Cleanup must succeed before the finalizer may come off.
    let action = TryFutureExt::into_future(reconcile(Event::Cleanup(obj.clone())))
        .await
        .map_err(Error::CleanupFailed)?;
    remove(api, name, &obj_name, &obj)
        .await
        .map_err(Error::RemoveFinalizer)?;
    Ok(action)
}

enum Added<K> {
    Now,
    /// Already on the object the API server holds (our view was older):
    /// that object, to go on with.
    Before(Arc<K>),
    /// The object is gone.
    Gone,
}

async fn add<K, E>(api: &Api<K>, name: &str, obj: &K) -> Result<Added<K>, Error<E>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    E: std::error::Error + 'static,
{
    let obj_name = obj.meta().name.clone().ok_or(Error::UnnamedObject)?;
    let mut current = obj.finalizers().to_vec();
    let mut reread = false;
    loop {
        let patch = Patch::Json::<()>(json_patch(add_ops(&current, name)));
        match api.patch(&obj_name, &PatchParams::default(), &patch).await {
            Ok(_) => return Ok(Added::Now),
            Err(e) if is_gone(&e) => return Ok(Added::Gone),
            Err(e) if is_stale_view(&e) && !reread => {
                reread = true;
                debug!(object = %obj_name, finalizer = name, "finalizers changed since our view; reading the object");
                let Some(fresh) = api.get_opt(&obj_name).await.map_err(Error::AddFinalizer)? else {
                    return Ok(Added::Gone);
                };
                if index_of(&fresh, name).is_some() {
                    return Ok(Added::Before(Arc::new(fresh)));
                }
                if fresh.meta().deletion_timestamp.is_some() {
                    // No new finalizers on an object being deleted; ours never ran.
                    return Ok(Added::Gone);
                }
                current = fresh.finalizers().to_vec();
            }
            Err(e) => return Err(Error::AddFinalizer(e)),
        }
    }
}

async fn remove<K>(api: &Api<K>, name: &str, obj_name: &str, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let Some(mut index) = index_of(obj, name) else {
        return Ok(());
    };
    let mut reread = false;
    loop {
        let patch = Patch::Json::<()>(json_patch(remove_ops(index, name)));
        match api.patch(obj_name, &PatchParams::default(), &patch).await {
            Ok(_) => return Ok(()),
            // Our finalizer was the last one and a stale copy asked again.
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) if is_stale_view(&e) && !reread => {
                reread = true;
                debug!(object = %obj_name, finalizer = name, "finalizers changed since our view; reading the object");
                match api.get_opt(obj_name).await?.and_then(|fresh| index_of(&fresh, name)) {
                    Some(i) => index = i,
                    None => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: Vec<serde_json::Value>) -> String {
        serde_json::to_string(&json_patch(v)).expect("serialises")
    }

    #[test]
    fn an_object_without_finalizers_gets_a_list_that_was_absent() {
        assert_eq!(
            ops(add_ops(&[], "gpupool.dev/x")),
            r#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["gpupool.dev/x"]}]"#
        );
    }

    #[test]
    fn an_object_with_finalizers_gets_ours_appended_to_the_list_we_saw() {
        assert_eq!(
            ops(add_ops(&["other.io/y".into()], "gpupool.dev/x")),
            r#"[{"op":"test","path":"/metadata/finalizers","value":["other.io/y"]},{"op":"add","path":"/metadata/finalizers/-","value":"gpupool.dev/x"}]"#
        );
    }

    #[test]
    fn removal_names_the_position_and_checks_it_holds_ours() {
        assert_eq!(
            ops(remove_ops(2, "gpupool.dev/x")),
            r#"[{"op":"test","path":"/metadata/finalizers/2","value":"gpupool.dev/x"},{"op":"remove","path":"/metadata/finalizers/2"}]"#
        );
    }

    #[test]
    fn only_a_failed_test_reads_as_a_stale_view() {
        let api = |code: u16| kube::Error::Api(kube::core::Status::failure("m", "r").with_code(code).boxed());
        assert!(is_stale_view(&api(422)));
        assert!(!is_stale_view(&api(409)));
        assert!(!is_stale_view(&api(403)));
        assert!(is_gone(&api(404)));
        assert!(!is_gone(&api(422)));
    }
}
