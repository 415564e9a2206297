//! The gateway's own handlers, planned like any request: `DocumentReference/$docref` becomes a narrowed
//! DocumentReference search once its patient is found visible; bulk `$export` kick-offs are narrowed per type
//! (`policy::export`) after the Group and any named patient are found visible, and the status and file links the
//! gateway handed out stand for the upstream URLs they were signed for.

use fhirgw_config::pattern::Class;
use fhirgw_config::route::{Action, Handler};
use http::Method;
use http::header::{self, HeaderName, HeaderValue};

use super::search::self_url;
use super::write::FHIR_JSON;
use super::{Planned, Planner, Stop};
use crate::policy::compartment::Reach;
use crate::policy::docref;
use crate::policy::export::{self, Binding, ExportClaims, FILE_OP, KickOffError, LinkKind, STATUS_OP, TOKEN_PARAM};
use crate::policy::plan::{BundleExpect, Call, Expect, Payload, Query, Step};
use crate::policy::query::{self, Params, Use};
use crate::policy::refusal::Refusal;
use crate::policy::scopes::Permission;

const DOCUMENT_REFERENCE: &str = "DocumentReference";
const NDJSON: &str = "application/fhir+ndjson";

impl Planner<'_> {
    pub(super) fn handler(&self, handler: Handler) -> Planned {
        match handler {
            Handler::DocRef => self.docref(),
            Handler::Export => self.export(),
        }
    }

    /// `DocumentReference/$docref` (GET with a query, or POST with a `Parameters` body).
    fn docref(&self) -> Planned {
        self.require(DOCUMENT_REFERENCE, Permission::Search)?;
        self.require(DOCUMENT_REFERENCE, Permission::Read)?;
        let mut pairs = self.input.params.clone();
        if self.input.method == Method::POST {
            let body = self.resource_body("Parameters")?;
            pairs.extend(docref::from_parameters(&body).map_err(Refusal::from)?);
        }
        let docref = docref::parse(&pairs).map_err(Refusal::from)?;
        let params = docref.search_params();
        query::check(Use::Search, &params, self.env.guard).map_err(Refusal::from)?;
        // The Patient is only checked, never returned, so it needs no scope of its own.
        self.visible("Patient", &docref.patient, None, &Reach::Tenant)?;
        let narrowed = query::narrow(&params, &self.access.tag_refs()).ok_or(Refusal::NotFound)?;
        let expect = BundleExpect {
            path: DOCUMENT_REFERENCE.to_owned(),
            // A POST's parameters as the equivalent GET.
            self_url: self_url(self.env.public, &format!("{DOCUMENT_REFERENCE}/$docref"), &pairs),
            narrowed: true,
            head: false,
        };
        Ok(Step::Send(Call::get(self.target(&[DOCUMENT_REFERENCE.to_owned()], &narrowed), Expect::Bundle(expect))))
    }

    fn export(&self) -> Planned {
        let path: Vec<&str> = self.input.relative.iter().map(String::as_str).collect();
        let method = &self.input.method;
        match (method, path.as_slice()) {
            (&Method::GET, [STATUS_OP]) => {
                let claims = self.followed(LinkKind::Status)?;
                let mut call = Call::get(claims.target, Expect::ExportStatus);
                call.headers.push((header::ACCEPT, HeaderValue::from_static("application/json")));
                Ok(Step::Send(call))
            }
            (&Method::DELETE, [STATUS_OP]) => {
                let claims = self.followed(LinkKind::Status)?;
                let mut call = Call::get(claims.target, Expect::ExportCancel);
                call.method = Method::DELETE;
                Ok(Step::Send(call))
            }
            (&Method::GET, [FILE_OP]) => {
                let claims = self.followed(LinkKind::File)?;
                let mut call = Call::get(claims.target, Expect::ExportFile { declared: claims.resource_type });
                call.headers.push((header::ACCEPT, HeaderValue::from_static(NDJSON)));
                Ok(Step::Send(call))
            }
            (&Method::GET | &Method::POST, ["$export"]) => {
                let (params, patients) = self.kickoff_params()?;
                if !patients.is_empty() {
                    return Err(
                        Refusal::bad_request("`patient` applies to Patient- and Group-level exports only.").into()
                    );
                }
                self.kickoff(params, &patients, None)
            }
            (&Method::GET | &Method::POST, ["Patient", "$export"]) => {
                let (params, patients) = self.kickoff_params()?;
                self.kickoff(params, &patients, Some(None))
            }
            (&Method::GET | &Method::POST, ["Group", id, "$export"]) if Class::Id.accepts(id) => {
                let (params, patients) = self.kickoff_params()?;
                self.kickoff(params, &patients, Some(Some(id)))
            }
            // A route that sends anything else to this handler.
            _ => Err(Refusal::NoRoute.into()),
        }
    }

    fn binding(&self, kind: LinkKind) -> Binding<'_> {
        Binding {
            kind,
            tenant: &self.access.tenant,
            upstream: &self.env.upstream.name,
            base_path: &self.env.upstream.base_path,
        }
    }

    /// The claims of the export link this request follows, exactly as the gateway handed it out.
    fn followed(&self, kind: LinkKind) -> Result<ExportClaims, Stop> {
        let [(name, token)] = self.input.params.as_slice() else {
            return Err(Refusal::bad_request("use the link exactly as the gateway handed it out").into());
        };
        if name != TOKEN_PARAM {
            return Err(Refusal::bad_request("use the link exactly as the gateway handed it out").into());
        }
        Ok(ExportClaims::verify(self.env.signer, token, &self.binding(kind), self.access.now).map_err(Refusal::from)?)
    }

    /// A kick-off's parameters and the patients it names: from the query of a `GET`, or the `Parameters` body of a
    /// `POST` (which then must have no query: one place for the parameters, so none can slip past the checks).
    fn kickoff_params(&self) -> Result<(Params, Vec<String>), Stop> {
        if self.input.method != Method::POST {
            return Ok((self.input.params.clone(), Vec::new()));
        }
        if !self.input.params.is_empty() {
            return Err(
                Refusal::bad_request("A POST kick-off takes its parameters in the Parameters body only.").into()
            );
        }
        let body = self.resource_body("Parameters")?;
        export::parameters(&body).map_err(|e| kickoff_refusal(e).into())
    }

    /// `level`: set for a Patient- or Group-level export (with the Group's id). The Group and every named patient
    /// must be visible (else the same 404 as a missing one). The upstream gets the narrowed parameters as a `GET`
    /// kick-off (which every Bulk Data server supports), or as a `POST` `Parameters` body when patients are named.
    fn kickoff(&self, params: Params, patients: &[String], level: Option<Option<&str>>) -> Planned {
        if !self.input.respond_async {
            return Err(Refusal::bad_request("Bulk export needs the header `Prefer: respond-async`.").into());
        }
        let tags = self.access.tag_refs();
        let upstream_params =
            export::kickoff(&params, &tags, &self.access.scopes, self.env.guard).map_err(kickoff_refusal)?;
        if !self.export_routed() {
            return Err(Refusal::forbidden(
                "Bulk export is not fully routed on this gateway (its status and file endpoints are missing).",
            )
            .into());
        }
        if level.is_some() {
            let group = level.flatten().map(|id| Query::resource("Group", id));
            let named = patients.iter().map(|id| Query::resource("Patient", id));
            if !self.access.grants.is_empty() {
                self.need(group.into_iter().chain(named))?;
            }
            if let Some(Some(id)) = level {
                self.visible("Group", id, None, &Reach::Tenant)?;
            }
            for id in patients {
                self.visible("Patient", id, None, &Reach::Tenant)?;
            }
        }
        let async_header = (HeaderName::from_static("prefer"), HeaderValue::from_static("respond-async"));
        let mut call = if patients.is_empty() {
            Call::get(self.target(&self.input.relative, &upstream_params), Expect::ExportKickOff)
        } else {
            let body = export::upstream_parameters(&upstream_params, patients);
            let mut call = Call::get(self.target(&self.input.relative, &[]), Expect::ExportKickOff);
            call.method = Method::POST;
            call.body = Some(Payload::Json { content_type: FHIR_JSON, value: body });
            call
        };
        call.headers.push(async_header);
        Ok(Step::Send(call))
    }

    /// Whether the status and file endpoints lead back to this handler and upstream.
    fn export_routed(&self) -> bool {
        [STATUS_OP, FILE_OP].iter().all(|op| {
            let path = [(*op).to_owned()];
            self.env.table.route(&Method::GET, &path).is_some_and(|m| {
                matches!(&m.route.action, Action::Handler { handler: Handler::Export, upstream }
                    if *upstream == self.env.upstream.name)
            })
        })
    }
}

fn kickoff_refusal(e: KickOffError) -> Refusal {
    match e {
        KickOffError::Query(e) => Refusal::Query(e),
        other => Refusal::Forbidden(other.to_string()),
    }
}
