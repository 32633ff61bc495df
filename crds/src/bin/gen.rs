//! Writes every CRD as YAML, one file a resource, so `make crds` regenerates
//! the committed copies and CI can diff them.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out: PathBuf = args.next().map(PathBuf::from).unwrap_or_else(|| "crds/yaml".into());
    std::fs::create_dir_all(&out)?;
    for (file, yaml) in gpupool_crds::yaml::all()? {
        std::fs::write(out.join(file), yaml)?;
    }
    Ok(())
}
