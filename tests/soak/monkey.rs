//! The soak's chaos monkey: while the sessions run it makes the upstream accounts fail the way
//! real ones do (outages, refused handshakes, dropped and deaf connections, random errors,
//! lost caches, a revoked credential), switches an account's transport at run time as an
//! operator would, and with Redis restarts the Redis mid-run.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard::mock::{HandshakeFault, MockLog, MockState};
use tokio_util::sync::CancellationToken;

use crate::common::multi::TOKEN;
use crate::common::redis::RedisServer;

/// Where the monkey acts.
pub struct Target {
    pub accounts: Vec<(String, Arc<MockState>)>,
    pub relay: String,
    pub redis: Option<RedisServer>,
}

fn refusal(status: u16, retry_after: Option<&str>) -> HandshakeFault {
    HandshakeFault {
        status,
        retry_after: retry_after.map(str::to_string),
    }
}

impl Target {
    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<&str>) {
        let url = format!("http://{}/admin/v1/accounts/{path}", self.relay);
        let mut req = reqwest::Client::new()
            .request(method, url)
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let status = req.send().await.expect("admin API").status();
        assert!(status.is_success(), "admin {path}: {status}");
    }

    /// One act of chaos on account `i`; returns its name.
    async fn act(&mut self, rng: &mut StdRng, i: usize) -> &'static str {
        let (id, mock) = self.accounts[i].clone();
        let pause = Duration::from_millis(rng.random_range(100..600));
        match rng.random_range(0..9) {
            0 => {
                mock.set_outage(Some(refusal(503, None)));
                tokio::time::sleep(pause).await;
                mock.set_outage(None);
                "outage"
            }
            1 => {
                let code = [1001, 1011, 1012, 1013][rng.random_range(0..4)];
                mock.close_all(code);
                "close all connections"
            }
            2 => {
                mock.deafen_all();
                tokio::time::sleep(pause).await;
                mock.close_all(1001);
                "deafen all connections"
            }
            3 => {
                mock.push_handshake(refusal(429, Some("1")));
                "handshake 429"
            }
            4 => {
                mock.push_handshake(refusal(500, None));
                "handshake 500"
            }
            5 => {
                mock.set_fail_rate(150);
                tokio::time::sleep(pause).await;
                mock.set_fail_rate(0);
                "random server errors"
            }
            6 => {
                mock.forget_epoch
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                "forget every cache"
            }
            7 => {
                // A revoked credential disables the account (UP-8) until an operator enables it.
                mock.set_outage(Some(refusal(401, None)));
                tokio::time::sleep(pause).await;
                mock.set_outage(None);
                self.admin(reqwest::Method::POST, &format!("{id}/enable"), None)
                    .await;
                "credential refused, then enabled"
            }
            _ => {
                // TM-3: the operator moves the account to http and back while it serves.
                let mode = format!("{id}/mode");
                self.admin(reqwest::Method::POST, &mode, Some(r#"{"mode":"http"}"#))
                    .await;
                tokio::time::sleep(pause).await;
                self.admin(reqwest::Method::DELETE, &format!("{id}/override"), None)
                    .await;
                "mode switched to http and back"
            }
        }
    }

    /// Acts every 50–300 ms until `stop`; with Redis, restarts it once `redis_at` acts in.
    /// Returns the acts by name.
    pub async fn run(
        mut self,
        seed: u64,
        stop: CancellationToken,
        redis_at: usize,
    ) -> (Vec<&'static str>, Self) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut acts = Vec::new();
        while !stop.is_cancelled() {
            let wait = Duration::from_millis(rng.random_range(50..300));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => break,
            }
            if acts.len() == redis_at {
                if let Some(redis) = self.redis.as_mut() {
                    redis.stop();
                    tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
                    redis.restart();
                    acts.push("redis restarted empty");
                    continue;
                }
            }
            let i = rng.random_range(0..self.accounts.len());
            acts.push(self.act(&mut rng, i).await);
            // The mocks log every request in full; a long soak must not keep them all.
            for (_, mock) in &self.accounts {
                mock.with_log(|l| *l = MockLog::default());
            }
        }
        (acts, self)
    }

    /// Ends every lasting fault and clears the operator's overrides.
    pub async fn calm(&self) {
        for (id, mock) in &self.accounts {
            mock.set_outage(None);
            mock.set_fail_rate(0);
            self.admin(reqwest::Method::DELETE, &format!("{id}/override"), None)
                .await;
        }
    }
}
