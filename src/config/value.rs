//! Value types the config is made of: secrets that never print, durations with a unit, and the
//! account mode.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A credential from the config. `Debug` and `Display` print `***` so a logged config never
/// leaks a key; `expose` is the one way to read it, which keeps reads easy to audit.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How an account talks to its upstream (SPEC §2 `accounts[].mode`). Only `ctx_pool` exists so
/// far; `passthrough` is named in the SPEC but refused until its transport lands, so a config
/// never silently selects a transport that does not exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum AccountMode {
    /// Pooled upstream WebSocket contexts, bound to conversations (§5).
    #[default]
    CtxPool,
    /// Upstream `POST /responses` with SSE, one request per turn (TM-1).
    Http,
    /// One upstream WebSocket per client socket, frames relayed as they are (TM-1).
    Passthrough,
}

impl AccountMode {
    pub fn parse(name: &str) -> Option<AccountMode> {
        match name {
            "ctx_pool" => Some(AccountMode::CtxPool),
            "http" => Some(AccountMode::Http),
            "passthrough" => Some(AccountMode::Passthrough),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            AccountMode::CtxPool => "ctx_pool",
            AccountMode::Http => "http",
            AccountMode::Passthrough => "passthrough",
        }
    }
}

impl fmt::Display for AccountMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AccountMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "ctx_pool" => Ok(AccountMode::CtxPool),
            "http" => Ok(AccountMode::Http),
            "passthrough" => Ok(AccountMode::Passthrough),
            _ => Err(de::Error::custom(format!(
                "unknown variant \"{name}\", expected ctx_pool, passthrough or http"
            ))),
        }
    }
}

/// Reads a duration written with a unit (`"250ms"`, `"20s"`, `"55m"`). A bare number is refused:
/// "20" could mean seconds or milliseconds, and guessing wrong is silent.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, like \"20s\" or \"250ms\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text.trim()).map_err(|e| {
                E::custom(format!(
                    "invalid duration \"{text}\" ({e}); write it with a unit, like \"20s\" or \"250ms\""
                ))
            })
        }
    }

    d.deserialize_str(DurationVisitor)
}

/// Lets a section be present but empty (`session:` with every line below commented out), which
/// YAML reads as null, and means the defaults.
pub(super) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
