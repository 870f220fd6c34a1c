//! The client identity headers carried onto upstream dials (SPEC WS-7).

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// Headers of the client's handshake that the upstream sees on dials this session causes.
/// `Authorization` is never among them: the upstream gets the account's key.
const FORWARDED: &[&str] = &[
    "originator",
    "session-id",
    "session_id",
    "thread-id",
    "conversation_id",
    "x-codex-window-id",
    "x-codex-turn-metadata",
    "x-codex-beta-features",
    "x-codex-turn-state",
    "user-agent",
    "accept-language",
];

/// The identity headers of one client session.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Identity {
    pub fn from_headers(h: &HeaderMap) -> Self {
        let headers = FORWARDED
            .iter()
            .filter_map(|name| {
                let v = h.get(*name)?;
                Some((HeaderName::from_static(name), v.clone()))
            })
            .collect();
        Identity { headers }
    }

    /// Adds or replaces one header.
    pub fn set(&mut self, name: &'static str, value: HeaderValue) {
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((HeaderName::from_static(name), value));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws7_keeps_identity_and_never_authorization() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer client-key"),
        );
        h.insert("session-id", HeaderValue::from_static("s1"));
        h.insert("user-agent", HeaderValue::from_static("codex"));
        h.insert("x-other", HeaderValue::from_static("no"));
        let id = Identity::from_headers(&h);
        assert_eq!(id.get("session-id"), Some("s1"));
        assert_eq!(id.get("user-agent"), Some("codex"));
        assert!(id.get("authorization").is_none());
        assert_eq!(id.headers.len(), 2);
    }
}
