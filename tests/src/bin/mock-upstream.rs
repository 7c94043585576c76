//! The mock OpenAI-compatible upstream as a process, for demos and the benchmark.
//! Usage: mock-upstream [ADDR] [THREADS]   (default 127.0.0.1:8000, 1 thread)
#![forbid(unsafe_code)]

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8000".into());
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let Ok(addr) = addr.parse() else {
        eprintln!("usage: mock-upstream [ADDR] [THREADS]");
        std::process::exit(2);
    };
    let up = modelgate_tests::upstream::MockUpstream::start_on(addr, threads);
    println!("mock upstream listening on http://{}/v1", up.addr);
    loop {
        std::thread::park();
    }
}
