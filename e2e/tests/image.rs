//! The container image the chart runs, built by `e2e/image.sh` with no
//! container engine, read the way a runtime reads it: the index names a
//! manifest, every blob matches its digest and size, the config's diff_id is
//! the unpacked layer's. Then the layer is unpacked and its binaries run from
//! inside it, as the unprivileged user the config names: the chart's
//! commands are on the image's PATH, the C library they link is there, the
//! agent reads a simulated inventory, and with no NVIDIA driver it says so.
//!
//! Built from the debug binaries `make e2e` already has; `make image` runs
//! the same script on release binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpupool_e2e::harness::{workspace, workspace_bin};
use sha2::{Digest, Sha256};

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A blob of the unpacked layout, checked against its descriptor.
fn blob(layout: &Path, descriptor: &serde_json::Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().expect("a digest");
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("the blob is in the layout");
    assert_eq!(sha256_hex(&bytes), hex, "blob {digest} does not match its digest");
    assert_eq!(
        u64::try_from(bytes.len()).ok(),
        descriptor["size"].as_u64(),
        "blob {digest} has the wrong size"
    );
    bytes
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON")
}

/// Runs a binary of the image from inside its root. chroot(8) puts the
/// process in the image's filesystem as the image's user, which proves the
/// layout as a runtime uses it. Where chroot is not permitted, the image's own
/// loader runs the binary against the image's own libraries, which still
/// proves the image holds everything the binaries link.
enum Inside {
    Chroot {
        chroot: PathBuf,
        root: PathBuf,
        user: String,
        path: String,
    },
    Loader {
        root: PathBuf,
    },
}

/// chroot(8) on this machine. Found here, not by the child's PATH, which is
/// the image's.
fn chroot_bin() -> Option<PathBuf> {
    let host = std::env::var("PATH").unwrap_or_default();
    host.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join("chroot"))
        .find(|p| p.is_file())
}

impl Inside {
    fn new(root: &Path, user: &str, path: &str) -> Self {
        let Some(chroot) = chroot_bin() else {
            eprintln!("no chroot here; running through the image's loader instead");
            return Inside::Loader { root: root.to_owned() };
        };
        let probe = Command::new(&chroot)
            .arg(format!("--userspec={user}"))
            .arg(root)
            .args(["gpupool", "--version"])
            .env_clear()
            .env("PATH", path)
            .output();
        // Only chroot's own refusal sends the checks to the loader; a binary
        // that fails inside the root is the image's fault, and the checks
        // below say so.
        let refused = match &probe {
            Err(_) => true,
            Ok(o) => String::from_utf8_lossy(&o.stderr).contains("cannot change root directory"),
        };
        if refused {
            eprintln!("chroot is not permitted here ({probe:?}); running through the image's loader instead");
            Inside::Loader { root: root.to_owned() }
        } else {
            eprintln!("running the image's binaries under chroot as {user}");
            Inside::Chroot {
                chroot,
                root: root.to_owned(),
                user: user.to_owned(),
                path: path.to_owned(),
            }
        }
    }

    /// A path inside the image, as the running binary sees it.
    fn path(&self, p: &str) -> String {
        match self {
            Inside::Chroot { .. } => p.to_owned(),
            Inside::Loader { root } => root.join(p.trim_start_matches('/')).to_string_lossy().into_owned(),
        }
    }

    fn run(&self, bin: &str, args: &[&str]) -> Output {
        let mut cmd = match self {
            Inside::Chroot {
                chroot,
                root,
                user,
                path,
            } => {
                let mut c = Command::new(chroot);
                c.arg(format!("--userspec={user}"))
                    .arg(root)
                    .arg(bin)
                    .env_clear()
                    .env("PATH", path);
                c
            }
            Inside::Loader { root } => {
                // The loader still searches this machine's own library
                // directories after the image's, so first check that every
                // library resolves inside the image.
                let loader = |list: bool| {
                    let mut c = Command::new(root.join("lib64/ld-linux-x86-64.so.2"));
                    c.arg("--inhibit-cache");
                    if list {
                        c.arg("--list");
                    }
                    c.arg("--library-path")
                        .arg(root.join("lib/x86_64-linux-gnu"))
                        .arg(root.join("usr/local/bin").join(bin))
                        .env_clear();
                    c
                };
                let listed = sh(&mut loader(true));
                let outside: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .filter_map(|l| l.split("=> ").nth(1)?.split_whitespace().next().map(str::to_owned))
                    .filter(|p| p.starts_with('/') && !Path::new(p).starts_with(root))
                    .collect();
                assert!(outside.is_empty(), "{bin} needs libraries the image lacks: {outside:?}");
                loader(false)
            }
        };
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {bin} in the image: {e}"))
    }
}

#[test]
fn the_image_holds_what_the_chart_runs() {
    let bin_dir = workspace_bin("gpupool-operator")
        .parent()
        .expect("a bin dir")
        .to_owned();
    let dir = std::env::temp_dir().join(format!("gpupool-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = workspace().join("e2e/image.sh");

    // Built twice from the same binaries: the same bytes.
    let (a, b) = (dir.join("a.tar"), dir.join("b.tar"));
    for out in [&a, &b] {
        sh(Command::new("bash").arg(&script).arg(&bin_dir).arg(out));
    }
    assert!(
        std::fs::read(&a).expect("a") == std::fs::read(&b).expect("b"),
        "two builds of the same binaries differ"
    );

    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).expect("layout dir");
    sh(Command::new("tar").arg("-xf").arg(&a).arg("-C").arg(&layout));
    assert_eq!(
        json(&std::fs::read(layout.join("oci-layout")).expect("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json(&std::fs::read(layout.join("index.json")).expect("index.json"));
    let manifest = json(&blob(&layout, &index["manifests"][0]));
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let config = json(&blob(&layout, &manifest["config"]));
    let layer_descriptor = &manifest["layers"][0];
    assert_eq!(
        layer_descriptor["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    blob(&layout, layer_descriptor);
    let layer_path = layout.join("blobs/sha256").join(
        layer_descriptor["digest"]
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:"),
    );

    // The reference the chart pulls: its image repository and appVersion.
    let chart: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(workspace().join("charts/gpupool/Chart.yaml")).expect("Chart"))
            .expect("Chart.yaml");
    let values: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(workspace().join("charts/gpupool/values.yaml")).expect("values"),
    )
    .expect("values.yaml");
    let reference = format!(
        "{}:{}",
        values["image"]["repository"].as_str().expect("image.repository"),
        chart["appVersion"].as_str().expect("appVersion")
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"], reference,
        "the archive is not tagged as the chart's image"
    );
    let docker = json(&std::fs::read(layout.join("manifest.json")).expect("manifest.json"));
    assert_eq!(docker[0]["RepoTags"][0], reference);

    // The config a runtime starts containers from.
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let user = config["config"]["User"].as_str().expect("a User").to_owned();
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a numeric user: runAsNonRoot can only check a number");
    assert_ne!(uid, 0, "the image runs as root");
    let path = config["config"]["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(|e| e.as_str()?.strip_prefix("PATH="))
        .next()
        .expect("a PATH")
        .to_owned();
    let unpacked = sh(Command::new("gzip").arg("-dc").arg(&layer_path)).stdout;
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", sha256_hex(&unpacked)),
        "the diff_id is not the unpacked layer's digest"
    );

    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).expect("rootfs dir");
    sh(Command::new("tar")
        .arg("-xzf")
        .arg(&layer_path)
        .arg("-C")
        .arg(&root)
        .arg("--no-same-owner"));
    let certs = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).expect("TLS roots");
    assert!(certs.contains("BEGIN CERTIFICATE"), "no TLS roots for https RPC URLs");

    // Every command the chart's templates run is on the image's PATH.
    let templates = std::fs::read_dir(workspace().join("charts/gpupool/templates")).expect("templates");
    let mut commands = Vec::new();
    for t in templates {
        let text = std::fs::read_to_string(t.expect("entry").path()).expect("template");
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("command: [\"") {
                commands.push(rest.split('"').next().expect("a command").to_owned());
            }
        }
    }
    commands.sort();
    assert_eq!(commands, ["gpupool-agent", "gpupool-operator"]);
    let found = |bin: &str| {
        path.split(':')
            .any(|d| root.join(d.trim_start_matches('/')).join(bin).is_file())
    };
    for c in &commands {
        assert!(found(c), "{c} is not on the image's PATH {path}");
    }

    let inside = Inside::new(&root, &user, &path);
    for (bin, expected) in [
        ("gpupool-operator", "gpupool-operator 0.1.0"),
        ("gpupool-agent", "gpupool-agent 0.1.0"),
        ("gpupool", "gpupool 0.1.0"),
    ] {
        let out = inside.run(bin, &["--version"]);
        assert!(out.status.success(), "{bin} does not start in the image: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    }

    // The agent reads a simulated inventory from inside the image...
    std::fs::write(
        root.join("tmp/inventory.yaml"),
        "product: NVIDIA H100 80GB HBM3\nmemoryMib: 81559\ncount: 8\n",
    )
    .expect("inventory");
    let inventory = inside.path("/tmp/inventory.yaml");
    let out = inside.run(
        "gpupool-agent",
        &[
            "--once",
            "--backend",
            "simulated",
            "--inventory",
            &inventory,
            "--node-name",
            "n1",
        ],
    );
    assert!(out.status.success(), "the simulated agent failed in the image: {out:?}");
    let status = json(&out.stdout);
    assert_eq!(status["gpus"].as_array().map(Vec::len), Some(8), "{status}");

    // ...and with no NVIDIA driver (none is in the image) it says what is
    // missing rather than crashing.
    let out = inside.run("gpupool-agent", &["--once", "--backend", "nvml", "--node-name", "n1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent read GPUs with no driver: {out:?}");
    assert!(stderr.contains("libnvidia-ml"), "{stderr}");

    std::fs::remove_dir_all(&dir).ok();
}
