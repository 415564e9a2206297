//! Why a bearer token is refused, in words a client developer can act on.
//!
//! Each kind has a stable code (the access log's `reason`, e.g. `token_expired`) and one sentence for the client,
//! sent both as the OperationOutcome's diagnostics and as the `error_description` of the `WWW-Authenticate`
//! challenge (RFC 6750 §3). The sentences say which check failed, never what the gateway expected beyond what is
//! public anyway (its own base URL as the audience): no key ids, no issuer list, no tenant names. The checks that
//! need a valid signature (expiry, audience, tenant) run only after the signature verified, so these answers tell
//! nothing to someone who cannot mint tokens.

/// The kind of an invalid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `exp` has passed (beyond the leeway), or the identity provider says it has.
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// `aud` names neither of this gateway's audiences (or is missing).
    WrongAudience,
    /// The tenant claim names a tenant the control plane does not know.
    UnknownTenant,
    /// The token carries no tenant claim, or one that is not a string.
    NoTenant,
    /// No identity provider is configured for the token's `iss` (or none of them can verify its tokens).
    UnknownIssuer,
    /// An opaque token, and no single identity provider introspects.
    OpaqueUnsupported,
    /// The signature does not verify, the key is not in the issuer's JWKS, or the algorithm is not allowed.
    Signature,
    /// Not a readable JWT, or one without `exp`/`iss`.
    Malformed,
    /// The `Authorization` header is not `Bearer <token>`.
    NotBearer,
    /// The identity provider's introspection says the token is not active (revoked, expired, unknown to it).
    Inactive,
}

/// One table of code and sentence per kind; the challenge is built from the same sentence at compile time (the
/// header value is `&'static`).
macro_rules! reasons {
    ($($kind:ident => $code:literal, $text:literal;)*) => {
        impl Reason {
            pub const ALL: &[Reason] = &[$(Reason::$kind),*];

            /// The stable code: the access log's `reason`.
            pub fn code(self) -> &'static str {
                match self { $(Reason::$kind => $code,)* }
            }

            /// The sentence the client gets.
            pub fn description(self) -> &'static str {
                match self { $(Reason::$kind => $text,)* }
            }

            /// The `WWW-Authenticate` value: RFC 6750's `invalid_token` with the sentence as `error_description`.
            pub fn challenge(self) -> &'static str {
                match self {
                    $(Reason::$kind => concat!(
                        "Bearer realm=\"fhirgw\", error=\"invalid_token\", error_description=\"", $text, "\""
                    ),)*
                }
            }
        }
    };
}

reasons! {
    Expired => "token_expired",
        "The bearer token has expired; get a new one.";
    NotYetValid => "token_not_yet_valid",
        "The bearer token is not valid yet (its nbf is in the future); the issuer's clock may be ahead.";
    WrongAudience => "token_wrong_audience",
        "The bearer token is not meant for this server: its aud must be this server's FHIR base URL.";
    UnknownTenant => "token_unknown_tenant",
        "The bearer token names a tenant this server does not know.";
    NoTenant => "token_no_tenant",
        "The bearer token carries no tenant claim (or one that is not a string).";
    UnknownIssuer => "token_unknown_issuer",
        "No identity provider here verifies tokens of the bearer token's issuer (iss).";
    OpaqueUnsupported => "token_opaque_unsupported",
        "The bearer token is not a JWT, and no identity provider here introspects opaque tokens.";
    Signature => "token_signature",
        "The bearer token's signature or signing key is not recognised.";
    Malformed => "token_malformed",
        "The bearer token is malformed, or lacks its exp or iss claim.";
    NotBearer => "token_not_bearer",
        "Send the credentials as Authorization: Bearer <token>.";
    Inactive => "token_inactive",
        "The identity provider says the bearer token is not active (revoked or expired).";
}

/// The kind of a `jsonwebtoken` verification failure.
pub(super) fn of_jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> Reason {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => Reason::Expired,
        K::ImmatureSignature => Reason::NotYetValid,
        K::InvalidAudience => Reason::WrongAudience,
        K::MissingRequiredClaim(claim) if claim == "aud" => Reason::WrongAudience,
        // The issuer chose the provider, so a mismatch here means `iss` was not what picked it.
        K::InvalidIssuer => Reason::UnknownIssuer,
        K::InvalidSignature
        | K::InvalidAlgorithm
        | K::InvalidEcdsaKey
        | K::InvalidEddsaKey
        | K::InvalidRsaKey(_)
        | K::InvalidKeyFormat => Reason::Signature,
        _ => Reason::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6750 §3: `error_description` is `%x20-21 / %x23-5B / %x5D-7E` (no quote, no backslash); codes are
    /// distinct and stable in form.
    #[test]
    fn sentences_fit_the_challenge_and_codes_are_distinct() {
        let mut codes = std::collections::HashSet::new();
        for reason in Reason::ALL {
            let text = reason.description();
            assert!(text.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'), "{reason:?}: {text}");
            assert!(reason.challenge().ends_with(&format!("error_description=\"{text}\"")), "{reason:?}");
            assert!(reason.challenge().contains("error=\"invalid_token\""), "{reason:?}");
            assert!(http::HeaderValue::from_str(reason.challenge()).is_ok(), "{reason:?}");
            let code = reason.code();
            assert!(code.starts_with("token_") && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{code}");
            assert!(codes.insert(code), "duplicate code {code}");
        }
    }

    #[test]
    fn jwt_errors_by_kind() {
        use jsonwebtoken::errors::ErrorKind as K;
        let cases = [
            (K::ExpiredSignature, Reason::Expired),
            (K::ImmatureSignature, Reason::NotYetValid),
            (K::InvalidAudience, Reason::WrongAudience),
            (K::MissingRequiredClaim("aud".into()), Reason::WrongAudience),
            (K::MissingRequiredClaim("exp".into()), Reason::Malformed),
            (K::InvalidIssuer, Reason::UnknownIssuer),
            (K::InvalidSignature, Reason::Signature),
            (K::InvalidAlgorithm, Reason::Signature),
            (K::InvalidToken, Reason::Malformed),
            (K::InvalidClaimFormat("exp".into()), Reason::Malformed),
        ];
        for (kind, want) in cases {
            assert_eq!(of_jwt_error(&kind), want, "{kind:?}");
        }
    }
}
