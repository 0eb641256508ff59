//! Who is asking, and what they may do: a bearer token compared in constant
//! time, or the service's own hook; nothing when neither is configured.

use axum::http::{header, HeaderMap, StatusCode};
use serde_json::json;

use super::api::ApiError;
use super::Inner;
use crate::port::projections::ProjectionStore;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// See status, dead letters and events (payloads only if allowed).
    Reader,
    /// Also rebuild, pause, resume, restart, retry and discard.
    Operator,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
        }
    }
}

/// A caller: a name for the logs, and a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who it is, as the action logs name it.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Principal {
    /// A caller named `name` with `role`.
    pub fn new(name: impl Into<String>, role: Role) -> Self {
        Principal {
            name: name.into(),
            role,
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({"name": self.name, "role": self.role.as_str()})
    }
}

/// Equal bytes, compared without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl<S: ProjectionStore> Inner<S> {
    /// The caller, if they may act as `needed`.
    pub(crate) fn allow(&self, headers: &HeaderMap, needed: Role) -> Result<Principal, ApiError> {
        if self.tokens.is_empty() && self.authorizer.is_none() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "disabled",
                "the console is off: configure a token or an authorization hook",
            ));
        }
        let principal = match &self.authorizer {
            Some(hook) => hook(headers),
            None => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim);
                given.and_then(|given| {
                    self.tokens
                        .iter()
                        .find(|(token, _)| same(token.as_bytes(), given.as_bytes()))
                        .map(|(_, principal)| principal.clone())
                })
            }
        };
        let Some(principal) = principal else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send `Authorization: Bearer <token>`",
            ));
        };
        if principal.role < needed {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this needs the operator role",
            ));
        }
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert!(!same(b"", b"x"));
        assert!(Role::Operator > Role::Reader);
    }
}
