//! The operator's libp2p identity: an ed25519 key kept in a Secret, created on
//! first start. Keeping it in the cluster (not the pod) means a restarted or
//! rescheduled operator is the same peer, so leases keep their counterpart.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use libp2p::identity::Keypair;
use tracing::info;

pub const SECRET_KEY: &str = "ed25519";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "Secret {namespace}/{name} key {SECRET_KEY:?} is not a libp2p ed25519 key; delete the Secret to create a new identity (peers will see a new member)"
    )]
    Corrupt { namespace: String, name: String },
}

/// Reads the identity from the Secret, creating it when absent. Two replicas
/// racing to create it both end up with whichever won.
pub async fn load_or_create(client: &Client, namespace: &str, name: &str) -> Result<Keypair, IdentityError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let corrupt = || IdentityError::Corrupt {
        namespace: namespace.into(),
        name: name.into(),
    };
    let decode = |s: &Secret| -> Result<Keypair, IdentityError> {
        let bytes = s.data.as_ref().and_then(|d| d.get(SECRET_KEY)).ok_or_else(corrupt)?;
        Keypair::from_protobuf_encoding(&bytes.0).map_err(|_| corrupt())
    };
    if let Some(s) = api.get_opt(name).await? {
        return decode(&s);
    }
    let key = Keypair::generate_ed25519();
    // Encoding an ed25519 keypair cannot fail; only unsupported key types do.
    let encoded = key.to_protobuf_encoding().map_err(|_| corrupt())?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "gpupool-operator".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("gpupool.dev/p2p-identity".into()),
        data: Some(BTreeMap::from([(SECRET_KEY.to_string(), ByteString(encoded))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(peer = %key.public().to_peer_id(), secret = %format!("{namespace}/{name}"), "created p2p identity");
            Ok(key)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => decode(&api.get(name).await?),
        Err(e) => Err(e.into()),
    }
}
