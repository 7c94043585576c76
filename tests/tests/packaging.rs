//! Container images: no image can be built here (no Docker engine), so check that each
//! Dockerfile builds and ships a binary the workspace really has, and that the chart asks
//! for the images those Dockerfiles make.

use std::process::Command;

use modelgate_tests::harness::repo_root;

/// (package, binary) for every [[bin]] in the workspace, from `cargo metadata`.
fn workspace_bins() -> Vec<(String, String)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(repo_root())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success());
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut bins = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            if t["kind"].as_array().unwrap().iter().any(|k| k == "bin") {
                bins.push((
                    p["name"].as_str().unwrap().to_owned(),
                    t["name"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    bins
}

#[test]
fn dockerfiles_ship_the_binaries_the_workspace_builds() {
    let bins = workspace_bins();
    let values = std::fs::read_to_string(repo_root().join("charts/modelgate/values.yaml")).unwrap();
    assert!(values.contains("repository: ghcr.io/modelgate"));
    for (dir, package, binary) in [
        ("dataplane", "modelgate-dataplane", "modelgate-dataplane"),
        ("operator", "modelgate-operator", "modelgate-operator"),
    ] {
        assert!(
            bins.contains(&(package.to_owned(), binary.to_owned())),
            "{package} has no binary {binary}: {bins:?}"
        );
        let text = std::fs::read_to_string(repo_root().join(dir).join("Dockerfile")).unwrap();
        for needle in [
            format!("cargo build --release --locked -p {package} --bin {binary}"),
            format!("cp target/release/{binary} /{binary}"),
            format!("COPY --from=build /{binary} /usr/local/bin/{binary}"),
            format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]"),
            "USER 65532:65532".to_owned(),
        ] {
            assert!(text.contains(&needle), "{dir}/Dockerfile lacks {needle:?}");
        }
        // Two stages: a Rust builder and a small runtime image.
        assert_eq!(
            text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")),
            2
        );
        // The chart runs the image this Dockerfile makes.
        let template =
            std::fs::read_to_string(repo_root().join("charts/modelgate/templates").join(
                match dir {
                    "dataplane" => "proxy.yaml",
                    _ => "operator.yaml",
                },
            ))
            .unwrap();
        assert!(
            template.contains(&format!("\"name\" \"{binary}\"")),
            "chart image for {binary}"
        );
    }
    let lock = repo_root().join("Cargo.lock");
    assert!(
        lock.exists(),
        "--locked builds need the committed Cargo.lock"
    );
}
