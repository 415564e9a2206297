//! Syntax of names, tags and other identifiers that appear in configuration.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} `{value}` is longer than {max} characters")]
    TooLong { what: &'static str, value: String, max: usize },
    #[error("{what} `{value}` is invalid: {rule}")]
    Invalid { what: &'static str, value: String, rule: &'static str },
}

/// Longest free-text field accepted anywhere in configuration.
pub const MAX_TEXT: usize = 2048;

fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.chars().count() > max {
        let shown: String = value.chars().take(64).collect();
        return Err(NameError::TooLong { what, value: shown, max });
    }
    Ok(())
}

/// Object names (tenants, upstreams, route tables, identity providers): `[a-z0-9][a-z0-9-]{0,62}`.
pub fn object_name(what: &'static str, value: &str) -> Result<(), NameError> {
    check_len(what, value, 63)?;
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok || !value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err(NameError::Invalid {
            what,
            value: value.to_owned(),
            rule: "use lowercase letters, digits and '-', starting with a letter or digit",
        });
    }
    Ok(())
}

/// Route ids: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn route_id(value: &str) -> Result<(), NameError> {
    check_len("route id", value, 63)?;
    let first_ok = value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(NameError::Invalid {
            what: "route id",
            value: value.to_owned(),
            rule: "use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit",
        });
    }
    Ok(())
}

/// A tag system: an absolute URI (`scheme:rest`) without whitespace or the search-syntax characters `|`, `,`, `\`.
pub fn tag_system(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "tag system";
    check_len(WHAT, value, 1024)?;
    let invalid = |rule| NameError::Invalid { what: WHAT, value: value.to_owned(), rule };
    let Some((scheme, rest)) = value.split_once(':') else {
        return Err(invalid("must be an absolute URI such as https://example.org/datasets"));
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || rest.is_empty() {
        return Err(invalid("must be an absolute URI such as https://example.org/datasets"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '|' | ',' | '\\' | '$')) {
        return Err(invalid("must not contain whitespace, control characters, '|', ',', '\\' or '$'"));
    }
    Ok(())
}

/// A tag code: `[A-Za-z0-9._:/-]{1,256}`; safe to place in a `_tag=system|code` search without escaping.
pub fn tag_code(value: &str) -> Result<(), NameError> {
    check_len("tag code", value, 256)?;
    if !value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')) {
        return Err(NameError::Invalid {
            what: "tag code",
            value: value.to_owned(),
            rule: "use letters, digits and . _ : / -",
        });
    }
    Ok(())
}

/// Free text (display names, messages).
pub fn text(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.chars().count() > MAX_TEXT {
        return Err(NameError::TooLong { what, value: value.chars().take(64).collect(), max: MAX_TEXT });
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(NameError::Invalid { what, value: value.to_owned(), rule: "must not contain control characters" });
    }
    Ok(())
}

/// An absolute http(s) URL.
pub fn http_url(what: &'static str, value: &str) -> Result<http::Uri, NameError> {
    check_len(what, value, MAX_TEXT)?;
    let invalid = |rule| NameError::Invalid { what, value: value.to_owned(), rule };
    let uri: http::Uri = value.parse().map_err(|_| invalid("must be an absolute http(s) URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid("must be an absolute http(s) URL")),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("must be an absolute http(s) URL"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid("must not carry credentials"));
    }
    if uri.query().is_some() {
        return Err(invalid("must not carry a query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        let cases: &[(&str, bool)] = &[
            ("tenant-a", true),
            ("a", true),
            ("0abc", true),
            ("", false),
            ("-a", false),
            ("Tenant", false),
            ("a_b", false),
            ("a b", false),
            ("ä", false),
            (&"x".repeat(63), true),
            (&"x".repeat(64), false),
        ];
        for (value, ok) in cases {
            assert_eq!(object_name("tenant", value).is_ok(), *ok, "{value:?}");
        }
    }

    #[test]
    fn tag_systems() {
        let cases: &[(&str, bool)] = &[
            ("https://fhirgw.dev/dataset", true),
            ("urn:oid:1.2.3", true),
            ("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66", true),
            ("dataset", false),
            (":x", false),
            ("https:", false),
            ("https://x|y", false),
            ("https://x,y", false),
            ("https://x y", false),
            ("https://x\\y", false),
            ("https://x/$y", false),
            ("", false),
        ];
        for (value, ok) in cases {
            assert_eq!(tag_system(value).is_ok(), *ok, "{value:?}");
        }
    }

    #[test]
    fn tag_codes() {
        let cases: &[(&str, bool)] = &[
            ("tenant-a", true),
            ("study/2024:arm.1_b", true),
            ("", false),
            ("a|b", false),
            ("a,b", false),
            ("a b", false),
            ("a$b", false),
            ("ä", false),
        ];
        for (value, ok) in cases {
            assert_eq!(tag_code(value).is_ok(), *ok, "{value:?}");
        }
    }

    #[test]
    fn urls() {
        let cases: &[(&str, bool)] = &[
            ("http://127.0.0.1:8080/fhir", true),
            ("https://hapi.internal/fhir/", true),
            ("ftp://x/fhir", false),
            ("/fhir", false),
            ("http://user:pw@x/fhir", false),
            ("http://x/fhir?a=b", false),
            ("not a url", false),
        ];
        for (value, ok) in cases {
            assert_eq!(http_url("url", value).is_ok(), *ok, "{value:?}");
        }
    }
}
