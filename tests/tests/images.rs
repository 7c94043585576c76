//! The container images `make images` builds, run by containerd (`ctr`), as a user would run
//! them: the dataplane image with the standalone quickstart config answers the official OpenAI
//! SDK, as a non-root user on a read-only root filesystem; the operator image starts and prints
//! its version. Needs `make test-cluster` (images built, containerd running:
//! MODELGATE_CONTAINERD, MODELGATE_IMAGES).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use modelgate_tests::harness::*;

/// containerd namespace of these tests, apart from the kubelet's `k8s.io`.
const NS: &str = "modelgate-images";

fn socket() -> String {
    std::env::var("MODELGATE_CONTAINERD")
        .expect("MODELGATE_CONTAINERD is not set: run `make test-cluster`, which starts containerd")
}

fn images_dir() -> PathBuf {
    std::env::var("MODELGATE_IMAGES")
        .map(PathBuf::from)
        .expect("MODELGATE_IMAGES is not set: run `make test-cluster`, which builds the images")
}

fn ctr(args: &[&str]) -> Output {
    Command::new("ctr")
        .args(["--address", &socket(), "-n", NS])
        .args(args)
        .output()
        .expect("run ctr")
}

fn ctr_ok(args: &[&str]) -> String {
    let out = ctr(args);
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Imports the archive of `name` and returns the image reference and the archive's size.
fn import(name: &str) -> (String, u64) {
    let archive = images_dir().join(format!("{name}.tar"));
    let size = std::fs::metadata(&archive)
        .unwrap_or_else(|e| panic!("{}: {e}", archive.display()))
        .len();
    ctr_ok(&["images", "import", archive.to_str().unwrap()]);
    let image = format!("ghcr.io/modelgate/{name}:{}", chart_app_version());
    assert!(
        ctr_ok(&["images", "ls", "-q"]).lines().any(|l| l == image),
        "{image} not in the archive"
    );
    (image, size)
}

/// A container started by `ctr run`; killed and removed on drop.
struct Container {
    id: String,
    run: Child,
}

impl Container {
    fn pid(&self) -> u32 {
        let tasks = ctr_ok(&["tasks", "ls"]);
        tasks
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(&self.id)).then(|| f.next().unwrap().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no task {} in {tasks}", self.id))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", &self.id]);
        let _ = self.run.wait();
        let _ = ctr(&["containers", "rm", &self.id]);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The value of `field` in /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The options of the container's root mount, as its process sees it.
fn root_mount_options(pid: u32) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&"/")).then(|| f[5].to_owned())
        })
        .expect("a root mount")
}

fn wait_file(path: &Path, run: &mut Child, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        if let Ok(Some(status)) = run.try_wait() {
            let mut err = String::new();
            if let Some(e) = run.stderr.as_mut() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("the container exited with {status} before listening: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "no {} within {within:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dataplane_image_serves_the_quickstart_as_a_non_root_user_on_a_read_only_root() {
    let (image, size) = import("modelgate-dataplane");
    let dir = temp_dir("image-run");
    // The container's user (65532) writes the bound addresses here; nothing else is writable.
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let config = repo_root().join("examples/standalone.yaml");
    let id = format!("dataplane-{}", std::process::id());
    let _ = ctr(&["containers", "rm", &id]);
    let started = Instant::now();
    let run = Command::new("ctr")
        .args([
            "--address",
            &socket(),
            "-n",
            NS,
            "run",
            "--rm",
            "--net-host",
            "--read-only",
        ])
        .args([
            "--mount",
            &format!(
                "type=bind,src={},dst=/etc/modelgate/standalone.yaml,options=rbind:ro",
                config.display()
            ),
            "--mount",
            &format!(
                "type=bind,src={},dst=/run/out,options=rbind:rw",
                out.display()
            ),
            &image,
            &id,
            "/usr/local/bin/modelgate-dataplane",
            "--config",
            "/etc/modelgate/standalone.yaml",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--addr-file",
            "/run/out/addr.json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    let mut c = Container { id, run };
    let addrs: serde_json::Value = serde_json::from_str(&wait_file(
        &out.join("addr.json"),
        &mut c.run,
        Duration::from_secs(30),
    ))
    .unwrap();
    let api = addrs["api"].as_str().unwrap().to_owned();
    let admin = addrs["admin"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(30), "the container is ready", || {
        let url = format!("http://{admin}/readyz");
        async move { get(&url, None).await.status.is_success() }
    })
    .await;
    let ready = started.elapsed();

    // The official SDK, through the container, with the quickstart's demo key.
    let answer = sdk_chat(&format!("http://{api}/v1"), "sk-modelgate-demo", "mock-gpt")
        .expect("a chat completion from the container");
    assert!(!answer.is_empty());

    let pid = c.pid();
    assert_eq!(
        proc_status(pid, "Uid:").split_whitespace().next(),
        Some("65532"),
        "runs as the image's non-root user"
    );
    let root = root_mount_options(pid);
    assert!(
        root.split(',').any(|o| o == "ro"),
        "the root filesystem is read-only: {root}"
    );
    let rss_kib: u64 = proc_status(pid, "VmRSS:")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();

    // SIGTERM stops it cleanly.
    ctr_ok(&["tasks", "kill", "-s", "SIGTERM", &c.id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = c.run.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    println!(
        "image {image}: {:.1} MiB archive; ready {} ms after `ctr run`; {:.1} MiB resident",
        mib(size),
        ready.as_millis(),
        rss_kib as f64 / 1024.0
    );
}

#[test]
fn the_operator_image_runs_its_static_binary_as_a_non_root_user() {
    let (image, size) = import("modelgate-operator");
    let id = format!("operator-{}", std::process::id());
    let _ = ctr(&["containers", "rm", &id]);
    let started = Instant::now();
    let out = ctr_ok(&[
        "run",
        "--rm",
        "--read-only",
        &image,
        &id,
        "/usr/local/bin/modelgate-operator",
        "--version",
    ]);
    assert!(out.starts_with("modelgate-operator "), "{out}");
    println!(
        "image {image}: {:.1} MiB archive; `--version` answered in {} ms",
        mib(size),
        started.elapsed().as_millis()
    );
}
