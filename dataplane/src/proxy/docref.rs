//! `DocumentReference/$docref` (US Core, IPA): GET with a query, or POST with a `Parameters` body. The request is
//! translated into a DocumentReference search (`policy::docref`), checked and narrowed to the tenant's tags like any
//! search, and streamed back with every entry verified. The focal Patient is checked first: one outside the grants
//! gets the same 404 as one that does not exist. Scopes: DocumentReference read and search; the Patient is only
//! checked, never returned, so it needs none.
//!
//! The answer is the search's Bundle; its page links are ordinary signed DocumentReference search pages. Without
//! `start`/`end` every DocumentReference of the patient is returned (the gateway does not pick "current" ones).

use std::time::SystemTime;

use fhirgw_config::path::join_encoded;
use fhirgw_config::tenant::Tag;
use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::ProxyError;
use super::access::{Ctx, Prepared};
use super::write::json_body;
use crate::body::Body;
use crate::policy::docref;
use crate::policy::query::{self, Use};
use crate::policy::scopes::Permission;
use crate::policy::verify::Grants;

const DOCUMENT_REFERENCE: &str = "DocumentReference";

impl Ctx<'_> {
    pub(super) async fn docref(
        &self,
        request: Request<Incoming>,
        tags: &[&Tag],
        grants: &Grants,
        now: SystemTime,
    ) -> Result<Response<Body>, ProxyError> {
        self.require(DOCUMENT_REFERENCE, Permission::Search)?;
        self.require(DOCUMENT_REFERENCE, Permission::Read)?;
        let mut pairs = query::parse(request.uri().query());
        if request.method() == Method::POST {
            let (_, body) = json_body(request, "Parameters").await?;
            pairs.extend(docref::from_parameters(&body)?);
        }
        let docref = docref::parse(&pairs)?;
        let params = docref.search_params();
        query::check(Use::Search, &params, self.guard)?;
        self.visible("Patient", &docref.patient, grants, &crate::policy::compartment::Reach::Tenant).await?;
        // `visible` found the patient inside the grants, so there are tags to narrow with.
        let narrowed = query::narrow(&params, tags).ok_or(ProxyError::ResourceNotFound)?;
        let base = join_encoded(&self.upstream.base_path, &[DOCUMENT_REFERENCE.to_owned()]);
        let prepared = Prepared {
            target: format!("{base}?{}", query::encode(&narrowed)),
            path: DOCUMENT_REFERENCE.to_owned(),
            // A POST's parameters as the equivalent GET.
            self_url: format!("{}/{DOCUMENT_REFERENCE}/$docref?{}", self.public, query::encode(&pairs)),
            narrowed: true,
        };
        self.stream_bundle(prepared, grants, now, false).await
    }
}
