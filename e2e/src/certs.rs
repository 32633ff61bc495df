//! A private CA per cluster and the certificates of everyone who talks to it:
//! the API server's serving cert and one client cert per identity, so the
//! test clusters run with real TLS, authentication and RBAC.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("writing {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Paths of one certificate and its key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub cert_path: PathBuf,
}

fn write(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents).map_err(|e| CertError::Io(path.to_path_buf(), e))
}

impl Ca {
    pub fn create(dir: &Path, name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("{name}-ca"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join("ca.crt");
        write(&cert_path, &cert.pem())?;
        write(&dir.join("ca.key"), &key.serialize_pem())?;
        Ok(Self { params, key, cert_path })
    }

    fn issue(&self, dir: &Path, file: &str, params: CertificateParams) -> Result<CertFiles, CertError> {
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let files = CertFiles {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// The API server's serving certificate, valid for loopback names only.
    pub fn server(&self, dir: &Path) -> Result<CertFiles, CertError> {
        self.serving(
            dir,
            "apiserver",
            "kube-apiserver",
            &["localhost", "127.0.0.1", "kubernetes", "kubernetes.default.svc"],
        )
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn serving(&self, dir: &Path, file: &str, common_name: &str, names: &[&str]) -> Result<CertFiles, CertError> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(dir, file, params)
    }

    /// A client certificate: the API server takes CN as the user name and O
    /// as the groups.
    pub fn client(&self, dir: &Path, file: &str, user: &str, groups: &[&str]) -> Result<CertFiles, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(dir, file, params)
    }
}

/// A service-account signing key (private, for signing) and its public half
/// (for verifying), for the API server and controller-manager.
pub fn service_account_key(dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
    let key = KeyPair::generate()?;
    let private = dir.join("sa.key");
    let public = dir.join("sa.pub");
    write(&private, &key.serialize_pem())?;
    write(&public, &key.public_key_pem())?;
    Ok((private, public))
}

/// A kubeconfig for one identity, pointing at the cluster by file paths.
pub fn kubeconfig(server: &str, ca: &Path, client: &CertFiles, cluster: &str, user: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: {user}@{cluster}
  context:
    cluster: {cluster}
    user: {user}
current-context: {user}@{cluster}
",
        ca = ca.display(),
        cert = client.cert.display(),
        key = client.key.display()
    )
}
