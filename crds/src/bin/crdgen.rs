//! Write the CRD manifests to `crds/manifests/` and the Helm chart's `crds/` directory (or
//! only to the directories given as arguments). Both copies come from the same types; a
//! test fails when either drifts.
#![forbid(unsafe_code)]

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<std::path::PathBuf> = std::env::args().skip(1).map(Into::into).collect();
    if dirs.is_empty() {
        dirs = vec![
            root.join("manifests"),
            root.join("../charts/modelgate/crds"),
        ];
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for (name, text) in modelgate_crds::manifests() {
            std::fs::write(dir.join(name), text)?;
            println!("wrote {}", dir.join(name).display());
        }
    }
    Ok(())
}
