//! Who is calling: a bearer token from the config maps to a caller id, which scopes idempotency
//! keys (two callers may use the same key without colliding) and labels metrics.

use serde::Deserialize;
use std::{collections::HashMap, sync::Arc};

use http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// The caller of a request, put in its extensions by the front handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Arc<str>);

impl Caller {
    /// The id used when authentication is off.
    pub fn anonymous() -> Self {
        Self(Arc::from("anonymous"))
    }
}

/// Token to caller lookup. Tokens are kept as SHA-256 digests so the lookup compares digests,
/// not secrets, and a memory dump does not show them verbatim.
#[derive(Debug, Clone)]
pub struct Callers {
    by_digest: HashMap<[u8; 32], Caller>,
    /// Shared, so an unauthenticated request does not allocate its caller id.
    anonymous: Caller,
}

impl Callers {
    /// From the config; an empty list turns authentication off.
    pub fn new(callers: &[CallerConfig]) -> Self {
        let by_digest = callers
            .iter()
            .map(|c| {
                (
                    Sha256::digest(c.token.as_bytes()).into(),
                    Caller(Arc::from(c.id.as_str())),
                )
            })
            .collect();
        Self {
            by_digest,
            anonymous: Caller::anonymous(),
        }
    }

    /// Whether a token is required.
    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// The caller of a request, or the 401 to answer.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Caller, Problem> {
        if !self.enabled() {
            return Ok(self.anonymous.clone());
        }
        let unauthorized = |detail: &str| {
            Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
                .detail(detail)
                .bearer_challenge()
        };
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values
            .next()
            .ok_or_else(|| unauthorized("an Authorization: Bearer token is required"))?;
        if values.next().is_some() {
            return Err(unauthorized("more than one Authorization header"));
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_digest
            .get(&digest)
            .cloned()
            .ok_or_else(|| unauthorized("unknown bearer token"))
    }
}

/// One caller allowed to use the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    /// Its id: scopes idempotency keys and labels metrics.
    pub id: String,
    /// The bearer token it presents in `Authorization: Bearer ...`.
    pub token: String,
}

/// Checks the `[[callers]]` entries: printable ids, tokens of 8 characters or more, neither
/// repeated.
pub(crate) fn validate(callers: &[CallerConfig]) -> Result<(), crate::config::ConfigError> {
    use crate::config::invalid;
    let mut ids = std::collections::HashSet::new();
    let mut tokens = std::collections::HashSet::new();
    for (i, c) in callers.iter().enumerate() {
        if c.id.is_empty() || !c.id.chars().all(|ch| ch.is_ascii_graphic()) {
            return Err(invalid(
                format!("callers[{i}].id"),
                "must be non-empty printable ASCII without spaces",
            ));
        }
        if c.token.len() < 8 {
            return Err(invalid(
                format!("callers[{i}].token"),
                "must be at least 8 characters",
            ));
        }
        if !ids.insert(&c.id) {
            return Err(invalid(format!("callers[{i}].id"), "duplicate caller id"));
        }
        if !tokens.insert(&c.token) {
            return Err(invalid(format!("callers[{i}].token"), "duplicate token"));
        }
    }
    Ok(())
}
