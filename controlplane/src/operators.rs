//! Named operator credentials: the actor in the audit log is the operator's name, never the token.
//!
//! Two sources, usable together: the single token of `--operator-token-file` (named `operator`), and a file of
//! `name sha256-hex-of-token` lines (`--operators-file`; `#` comments and blank lines ignored), re-read when it
//! changes, so credentials are added and revoked without a restart. A file that does not parse is refused whole and
//! the last good one stays in force.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::auth::BearerAuth;

/// The authenticated operator, put in the request's extensions by the interceptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator(pub String);

/// The name of the single-token operator.
pub const SINGLE: &str = "operator";

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: expected `name sha256-hex`, got {fields} field(s)")]
    Fields { line: usize, fields: usize },
    #[error("line {line}: `{name}` is not a valid operator name (1-64 of A-Z a-z 0-9 . _ @ -)")]
    Name { line: usize, name: String },
    #[error("line {line}: the hash must be 64 hex digits (SHA-256 of the token)")]
    Hash { line: usize },
    #[error("line {line}: operator `{name}` appears twice")]
    Duplicate { line: usize, name: String },
}

/// Parses an operators file: token hash (lowercase hex) → name.
pub fn parse(text: &str) -> Result<HashMap<String, String>, ParseError> {
    let mut by_hash = HashMap::new();
    let mut names = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let fields: Vec<&str> = content.split_whitespace().collect();
        let [name, hash] = fields[..] else {
            return Err(ParseError::Fields { line, fields: fields.len() });
        };
        let name_ok = (1..=64).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'));
        if !name_ok {
            return Err(ParseError::Name { line, name: name.to_owned() });
        }
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ParseError::Hash { line });
        }
        if !names.insert(name.to_owned()) {
            return Err(ParseError::Duplicate { line, name: name.to_owned() });
        }
        by_hash.insert(hash.to_ascii_lowercase(), name.to_owned());
    }
    Ok(by_hash)
}

/// SHA-256 of a token, lowercase hex: what the operators file holds (`printf %s "$TOKEN" | sha256sum`).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[derive(Clone)]
pub struct OperatorAuth {
    single: Option<BearerAuth>,
    named: Arc<RwLock<HashMap<String, String>>>,
    file: Option<PathBuf>,
}

impl OperatorAuth {
    /// At least one source must be configured; an operators file must parse at start-up.
    pub fn new(single: Option<BearerAuth>, file: Option<&Path>) -> anyhow::Result<Self> {
        let named = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read the operators file {}: {e}", path.display()))?;
                parse(&text).map_err(|e| anyhow::anyhow!("operators file {}: {e}", path.display()))?
            }
            None => HashMap::new(),
        };
        if single.is_none() && file.is_none() {
            anyhow::bail!(
                "no operator credentials: pass --operators-file, or --operator-token-file / FHIRGW_OPERATOR_TOKEN"
            );
        }
        Ok(OperatorAuth { single, named: Arc::new(RwLock::new(named)), file: file.map(Path::to_owned) })
    }

    /// Re-reads the operators file whenever its modification time or size changes, every `every`.
    pub async fn watch(self, every: Duration) {
        let Some(path) = self.file.clone() else { return };
        let stamp =
            |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut seen = stamp(&path);
        loop {
            tokio::time::sleep(every).await;
            let now = stamp(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse(&t).map_err(|e| e.to_string()))
            {
                Ok(named) => {
                    info!(path = %path.display(), operators = named.len(), "operators file reloaded");
                    if let Ok(mut current) = self.named.write() {
                        *current = named;
                    }
                }
                Err(e) => warn!(path = %path.display(), error = %e, "operators file refused; keeping the previous one"),
            }
        }
    }

    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Operator, Status> {
        let Some(header) = header else {
            return Err(Status::unauthenticated("missing bearer token (operator credentials required)"));
        };
        if let Some(single) = &self.single
            && single.check(Some(header)).is_ok()
        {
            return Ok(Operator(SINGLE.to_owned()));
        }
        let token = std::str::from_utf8(header).ok().and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
        if !token.is_empty() {
            let hash = token_hash(token);
            if let Some(name) = self.named.read().ok().and_then(|named| named.get(&hash).cloned()) {
                return Ok(Operator(name));
            }
        }
        Err(Status::unauthenticated("invalid operator token"))
    }
}

impl tonic::service::Interceptor for OperatorAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let operator = self.authenticate(request.metadata().get("authorization").map(|v| v.as_bytes()))?;
        request.extensions_mut().insert(operator);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-token-0123456789abcdef";

    #[test]
    fn parses_operator_files() {
        let good =
            format!("# operators\n\nalice {}  # on call\nbob.smith@example {}\n", token_hash(ALICE), "A".repeat(64));
        let named = parse(&good).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(named.get(&token_hash(ALICE)).map(String::as_str), Some("alice"));
        assert_eq!(named.get(&"a".repeat(64)).map(String::as_str), Some("bob.smith@example"));
        let hash = token_hash(ALICE);
        for (text, want) in [
            ("alice".to_owned(), "expected"),
            (format!("alice {hash} extra"), "expected"),
            (format!("al ice {hash}"), "expected"),
            (format!("al/ice {hash}"), "valid operator name"),
            ("alice 1234".to_owned(), "64 hex"),
            (format!("alice {}", "g".repeat(64)), "64 hex"),
            (format!("alice {hash}\nalice {}", "b".repeat(64)), "twice"),
        ] {
            let err = parse(&text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn authenticates_by_name() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("operators");
        std::fs::write(&file, format!("alice {}\n", token_hash(ALICE))).unwrap_or_else(|e| panic!("{e}"));
        let single = BearerAuth::new("single-token-0123456789", "operator").unwrap_or_else(|e| panic!("{e}"));
        let auth = OperatorAuth::new(Some(single), Some(&file)).unwrap_or_else(|e| panic!("{e}"));
        let who = |h: &str| auth.authenticate(Some(h.as_bytes())).map(|o| o.0).map_err(|s| s.code());
        assert_eq!(who(&format!("Bearer {ALICE}")), Ok("alice".to_owned()));
        assert_eq!(who("Bearer single-token-0123456789"), Ok(SINGLE.to_owned()));
        assert_eq!(who("Bearer nobody-0123456789abcdef"), Err(tonic::Code::Unauthenticated));
        assert_eq!(who(&token_hash(ALICE)), Err(tonic::Code::Unauthenticated), "the hash is not a credential");
        assert_eq!(auth.authenticate(None).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
    }
}
