//! Public URLs and the rewriting of links the upstream wrote.
//!
//! Every public URL starts from `PublicConfig::base` (see `public.rs`); these functions only move upstream URLs
//! onto it.

use std::time::SystemTime;

use fhirgw_config::upstream::Upstream;
use serde_json::Value;

use crate::policy::paging::PageSigner;
use crate::policy::query::PAGE_PARAM;

/// What a page link needs to be signed.
pub struct PageContext<'a> {
    pub signer: &'a PageSigner,
    pub tenant: &'a str,
    /// Gateway path relative to the base, e.g. `Observation` or `Patient/1/_history`.
    pub path: &'a str,
    pub upstream: &'a Upstream,
    /// Public URL of this request (for `self`).
    pub self_url: String,
    pub public_base: &'a str,
}

/// Rewrites `Bundle.link`: `self` becomes the request's public URL; `next`/`previous`/`first`/`last` on the upstream
/// become signed page links; anything else (or any link not on the upstream) is dropped.
pub fn rewrite_links(bundle: &mut Value, ctx: &PageContext<'_>, now: SystemTime) {
    let Some(links) = bundle.get_mut("link").and_then(Value::as_array_mut) else { return };
    links.retain_mut(|link| {
        let relation = link.get("relation").and_then(Value::as_str).unwrap_or_default().to_owned();
        let url = link.get("url").and_then(Value::as_str).unwrap_or_default().to_owned();
        let new_url = match relation.as_str() {
            "self" => Some(ctx.self_url.clone()),
            "next" | "previous" | "prev" | "first" | "last" => upstream_target(ctx.upstream, &url).map(|target| {
                let claims = PageSigner::claims(ctx.tenant, ctx.path, &ctx.upstream.name, &target, now);
                let token = ctx.signer.sign(&claims);
                format!("{}/{}?{PAGE_PARAM}={token}", ctx.public_base, ctx.path)
            }),
            _ => None,
        };
        match new_url {
            Some(u) => {
                link["url"] = Value::String(u);
                true
            }
            None => false,
        }
    });
}

/// Path and query of an absolute URL on the upstream's base, if it is one.
pub fn upstream_target(upstream: &Upstream, url: &str) -> Option<String> {
    let rest = url.strip_prefix(&upstream.origin)?;
    let on_base = rest.strip_prefix(&upstream.base_path)?;
    if !(on_base.is_empty() || on_base.starts_with('/') || on_base.starts_with('?')) {
        return None;
    }
    Some(rest.to_owned())
}

/// An absolute URL on the upstream's base, moved to the public base; `None` for any other URL.
pub fn rewrite_url(upstream: &Upstream, public_base: &str, url: &str) -> Option<String> {
    let rest = url.strip_prefix(&upstream.base_url)?;
    (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')).then(|| format!("{public_base}{rest}"))
}
