//! Helpers shared by tests that need a broker of their own.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A nisshi process of this test's own; killed when dropped, even if the test fails.
pub struct Nisshi {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Nisshi {
    pub fn start() -> Nisshi {
        Nisshi::start_with(&[])
    }

    /// Starts nisshi with extra command-line arguments, its storage in a file of its own.
    pub fn start_with(extra: &[&str]) -> Nisshi {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("broker-nisshi-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nisshi = Nisshi {
            child: None,
            port,
            dir,
        };
        nisshi.spawn(extra);
        nisshi
    }

    fn binary() -> PathBuf {
        if let Ok(path) = std::env::var("NISSHI") {
            return path.into();
        }
        let home = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
        let installed = home.join("bin/nisshi");
        if installed.exists() {
            installed
        } else {
            PathBuf::from("nisshi")
        }
    }

    fn spawn(&mut self, extra: &[&str]) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(Nisshi::binary())
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://nisshi.db"])
            .args(extra)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start nisshi (scripts/brokers installs it): {error}")
            });
        self.child = Some(child);
        self.wait_until_it_answers();
    }

    fn wait_until_it_answers(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nisshi did not answer on port {}", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops nisshi and starts it again on the same port and storage, with `extra` arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.kill();
        self.spawn(extra);
    }

    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// `host:port` of this broker.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a SCRAM user (`scram256` or `scram512`) with nisshi's own command.
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        let status = Command::new(Nisshi::binary())
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://{}", self.address()),
            ])
            .args([name, password, "--mechanism", mechanism])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nisshi user create {name} failed");
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
