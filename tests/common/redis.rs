//! Redis for the shared-state tests: the one `scripts/test.sh` keeps on 127.0.0.1:6379 (each
//! test on keys of its own prefix), or a `redis-server` of the test's own, on a port of its own,
//! that the test can stop and start again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::HANG_GUARD;

/// The Redis every test may use.
pub const SHARED_URL: &str = "redis://127.0.0.1:6379";

/// A key prefix no other test run uses.
pub fn prefix(test: &str) -> String {
    format!("sy-it:{test}:{}", hex::encode(rand::random::<[u8; 6]>()))
}

/// A `redis-server` child without persistence: a restart starts empty, like a lost Redis.
pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None)
    }

    /// Starts one that wants `password` (`requirepass`) when given.
    pub fn start_with(password: Option<&str>) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut r = RedisServer {
            port,
            password: password.map(str::to_string),
            child: None,
        };
        r.restart();
        r
    }

    /// The URL a client uses, the password included.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills it (SIGKILL: nothing is saved) and waits until its port refuses.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and waits until it answers `PING`.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        self.child = Some(child);
        let start = std::time::Instant::now();
        while !self.answers() {
            assert!(
                start.elapsed() < HANG_GUARD,
                "hang guard: redis-server never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
        if let Some(p) = &self.password {
            let mut ok = [0u8; 5];
            let auth = format!("AUTH {p}\r\n");
            if c.write_all(auth.as_bytes()).is_err() || c.read_exact(&mut ok).is_err() {
                return false;
            }
        }
        let mut buf = [0u8; 7];
        c.write_all(b"PING\r\n").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy in front of `127.0.0.1:target` that holds every chunk sent toward it for
/// `delay`: a slow network to Redis, for what must not depend on Redis being quick.
pub async fn slow_proxy(target: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    port
}
