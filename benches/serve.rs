//! Targets: `serve` answers `GET /` within 50 ms of starting, and idles under 30 MB.
//! `cargo bench --bench serve`

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn get_root(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

#[tokio::main]
async fn main() {
    let w = support::World::new(Vec::new()).await;
    let mut startup = Vec::new();
    let mut idle_mb = 0.0;
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = support::command(&["serve"], &w.env());
        cmd.env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let t0 = Instant::now();
        let mut child = cmd.spawn().unwrap();
        while !get_root(port) {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_micros(500));
        }
        startup.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(2));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let rss_kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        idle_mb = rss_kb / 1024.0;
        let _ = child.kill();
        let _ = child.wait();
    }
    startup.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("machine: {}", common::machine());
    println!(
        "serve: GET / answered {:.1} ms after start (median of 5, worst {:.1} ms; target 50 ms); idle RSS {idle_mb:.1} MB (target < 30 MB)",
        startup[2], startup[4]
    );
}
