//! Searches and other Bundles: type and system searches (GET and `POST _search`), history, `$everything`. A
//! search is checked and narrowed with the tenant's tags; every Bundle streams back with each entry verified; a
//! signed page token stands for its upstream page and is valid only for the tenant, path and upstream it was made
//! for.

use fhirgw_config::pattern::Class;

use super::{Planned, Planner, Stop};
use crate::policy::compartment::{self, Reach};
use crate::policy::input::{RequestBody, Within};
use crate::policy::plan::{Answer, BundleExpect, Call, Expect, Step};
use crate::policy::query::{self, PAGE_PARAM, Params, Use};
use crate::policy::refusal::Refusal;
use crate::policy::scopes::Permission;

impl Planner<'_> {
    /// The query parameters, plus the form body of a `POST _search`.
    fn search_params(&self, post: bool) -> Result<Params, Stop> {
        let mut params = self.input.params.clone();
        if post {
            match &self.input.body {
                RequestBody::Form(form) => params.extend(form.iter().cloned()),
                _ => {
                    return Err(
                        Refusal::bad_request("POST _search needs an application/x-www-form-urlencoded body").into()
                    );
                }
            }
        }
        Ok(params)
    }

    pub(super) fn search_type(&self, ty: &str, post: bool) -> Planned {
        let params = self.search_params(post)?;
        self.bundle(ty, Use::Search, params)
    }

    /// A system-level search (`GET [base]?_type=…`, `POST [base]/_search`): `_type` is required and every type it
    /// names needs a tenant-wide search scope; the rest is checked and narrowed like a type search. Pages are signed
    /// for the base path.
    pub(super) fn search_system(&self) -> Planned {
        let params = self.search_params(self.input.method == http::Method::POST)?;
        let path = String::new();
        if let Some(token) = page_token(&params) {
            return self.page(token, &path, &params, Use::Search);
        }
        let (types, rest): (Vec<_>, Vec<_>) = params.iter().cloned().partition(|(name, _)| name == "_type");
        let types: Vec<String> = types.iter().flat_map(|(_, v)| v.split(',')).map(|t| t.trim().to_owned()).collect();
        if types.is_empty() || types.iter().any(|t| t.is_empty()) {
            return Err(
                Refusal::bad_request("a system-level search needs _type naming the resource types to search").into()
            );
        }
        for ty in &types {
            if !Class::Type.accepts(ty) {
                return Err(Refusal::bad_request(format!("_type: `{ty}` is not a resource type")).into());
            }
            self.require(ty, Permission::Search)?;
        }
        query::check(Use::Search, &rest, self.env.guard).map_err(Refusal::from)?;
        let tags = self.access.tag_refs();
        let Some(mut upstream_params) = query::narrow(&rest, &tags).filter(|_| !self.access.grants.is_empty()) else {
            return Ok(self.empty(Use::Search, &path, &params));
        };
        upstream_params.push(("_type".into(), types.join(",")));
        let target = self.target(&[], &upstream_params);
        Ok(self.send_bundle(target, path, &params, true))
    }

    /// A Bundle of `ty`: a search (`Use::Search`, narrowed), history or `$everything` (not narrowed upstream, every
    /// entry verified), or one of their pages.
    pub(super) fn bundle(&self, ty: &str, usage: Use, params: Params) -> Planned {
        // A search, GET or POST, is `[type]` on the upstream and in the links handed out.
        let segments: Vec<String> =
            if usage == Use::Search { vec![ty.to_owned()] } else { self.input.relative.clone() };
        let path = segments.join("/");
        let permission = if usage == Use::Search { Permission::Search } else { Permission::Read };
        let reach = match self.input.within {
            Within::Request => self.require_read(ty, permission)?,
            Within::Batch | Within::Transaction => {
                self.require(ty, permission)?;
                Reach::Tenant
            }
        };
        if let Some(token) = page_token(&params).filter(|_| self.input.within == Within::Request) {
            return self.page(token, &path, &params, usage);
        }
        query::check(usage, &params, self.env.guard).map_err(Refusal::from)?;
        if self.access.grants.is_empty() {
            return Ok(self.empty(usage, &path, &params));
        }
        let upstream_params = if usage == Use::Search {
            let tags = self.access.tag_refs();
            let Some(mut narrowed) = query::narrow(&params, &tags) else {
                return Ok(self.empty(usage, &path, &params));
            };
            // A patient/ scope: confined upstream too (every entry is checked regardless).
            if let Reach::Patient(patient) = &reach
                && let Some(param) = compartment::search_param(ty, patient)
            {
                narrowed.push(param);
            }
            narrowed
        } else {
            params.clone()
        };
        let target = self.target(&segments, &upstream_params);
        Ok(self.send_bundle(target, path, &params, usage == Use::Search))
    }

    /// A page of an earlier search: the signed token must be this tenant's, for this path and upstream.
    fn page(&self, token: &str, path: &str, params: &Params, usage: Use) -> Planned {
        let claims = self.env.signer.verify(token, self.access.now).map_err(Refusal::from)?;
        let base = self.env.upstream.base_path.trim_end_matches('/');
        let on_base = claims.target.strip_prefix(base).is_some_and(|rest| rest.starts_with(['/', '?']));
        if claims.tenant != self.access.tenant
            || claims.path != path
            || claims.upstream != self.env.upstream.name
            || !on_base
        {
            return Err(Refusal::bad_request("page token is not valid for this request").into());
        }
        if self.access.grants.is_empty() {
            return Ok(self.empty(usage, path, params));
        }
        // Tags may have changed since the token was made: entries are verified against today's grants.
        Ok(self.send_bundle(claims.target, path.to_owned(), params, claims.narrowed))
    }

    fn send_bundle(&self, target: String, path: String, params: &Params, narrowed: bool) -> Step {
        let self_url = self_url(self.env.public, &path, params);
        let expect = BundleExpect { path, self_url, narrowed, head: self.input.head };
        Step::Send(Call::get(target, Expect::Bundle(expect)))
    }

    fn empty(&self, usage: Use, path: &str, params: &Params) -> Step {
        let kind = if usage == Use::History { "history" } else { "searchset" };
        Step::Answer(Answer::EmptyBundle {
            kind,
            self_url: self_url(self.env.public, path, params),
            head: self.input.head,
        })
    }
}

/// The token when `params` is exactly one page token.
fn page_token(params: &Params) -> Option<&str> {
    match params.as_slice() {
        [(name, token)] if name == PAGE_PARAM => Some(token),
        _ => None,
    }
}

/// The public URL of a request for `self` links.
pub(super) fn self_url(public: &str, path: &str, params: &Params) -> String {
    let base = if path.is_empty() { public.to_owned() } else { format!("{public}/{path}") };
    if params.is_empty() { base } else { format!("{base}?{}", query::encode(params)) }
}
