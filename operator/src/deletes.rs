//! Deletes whose "not found" is the outcome asked for.
//!
//! Cleanup reads an object, then deletes it. Between the two, something
//! else can delete it first: a lease namespace being removed takes its Job
//! and AiJob with it, and the namespace controller is quicker than a
//! finalizer's second request. The API server answers 404, which is what
//! the cleanup wanted; taken as an error it failed the reconcile, counted
//! a reconcile error, logged a warning and held the finalizer five seconds
//! longer.

use std::fmt::Debug;

use kube::Api;
use kube::api::DeleteParams;
use serde::de::DeserializeOwned;

/// What a delete found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Deleted, or its deletion started (finalizers, foreground
    /// propagation): it may still be there for a while.
    Now,
    /// Gone before we asked.
    AlreadyGone,
}

/// Deletes `name`; an object that is already gone is not an error.
pub async fn delete_unless_gone<K>(api: &Api<K>, name: &str, dp: &DeleteParams) -> Result<Deleted, kube::Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    match api.delete(name, dp).await {
        Ok(_) => Ok(Deleted::Now),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Deleted::AlreadyGone),
        Err(e) => Err(e),
    }
}
