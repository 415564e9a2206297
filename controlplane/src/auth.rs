//! Bearer-token authentication for the operator API and for data planes. Two separate tokens: a data plane's token
//! can only open the config stream, never change configuration.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

/// Shortest token accepted at start-up.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Clone)]
pub struct BearerAuth {
    expected: Arc<[u8]>,
    who: &'static str,
}

impl BearerAuth {
    pub fn new(token: &str, who: &'static str) -> anyhow::Result<Self> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            anyhow::bail!("the {who} token must be at least {MIN_TOKEN_LEN} characters with no whitespace");
        }
        Ok(Self { expected: format!("Bearer {token}").into_bytes().into(), who })
    }

    /// Reads a token from a file, or else from an environment variable.
    pub fn load(file: Option<&Path>, env: &str, who: &'static str) -> anyhow::Result<Self> {
        let token = match file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read the {who} token file {}: {e}", path.display()))?,
            None => std::env::var(env).map_err(|_| anyhow::anyhow!("no {who} token: set {env} or pass its file"))?,
        };
        Self::new(&token, who)
    }

    pub fn check(&self, header: Option<&[u8]>) -> Result<(), Status> {
        match header {
            None => Err(Status::unauthenticated(format!("missing bearer token ({} credentials required)", self.who))),
            Some(value) if constant_time_eq::constant_time_eq(value, &self.expected) => Ok(()),
            Some(_) => Err(Status::unauthenticated(format!("invalid {} token", self.who))),
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata().get("authorization").map(|v| v.as_bytes()))?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(BearerAuth::new("short", "operator").is_err());
        assert!(BearerAuth::new("has a space in it!!", "operator").is_err());
        let auth = BearerAuth::new("0123456789abcdef\n", "operator").unwrap_or_else(|e| panic!("{e}"));
        assert!(auth.check(Some(b"Bearer 0123456789abcdef")).is_ok());
        for bad in [&b"Bearer 0123456789abcdeX"[..], b"bearer 0123456789abcdef", b"0123456789abcdef", b""] {
            assert_eq!(auth.check(Some(bad)).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        }
        assert_eq!(auth.check(None).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
    }
}
