//! Container images, checked without building them (`make test-cluster` builds and runs them:
//! tests/tests/images.rs): each Dockerfile ships, FROM scratch, a binary the workspace really
//! has and `make images` builds statically, and the chart asks for the images they make.

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
    let script = std::fs::read_to_string(repo_root().join("scripts/images.sh")).unwrap();
    assert!(script.contains("target-feature=+crt-static"));
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
            format!("COPY {binary} /usr/local/bin/{binary}"),
            format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]"),
            "USER 65532:65532".to_owned(),
        ] {
            assert!(text.contains(&needle), "{dir}/Dockerfile lacks {needle:?}");
        }
        // One stage on an empty base: nothing to pull, nothing but the binary.
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(froms, ["FROM scratch"], "{dir}/Dockerfile");
        // `make images` builds that binary statically.
        assert!(
            script.contains(&format!("-p {package} --bin {binary}")),
            "scripts/images.sh does not build {binary}"
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
