//! Batch and transaction Bundles: each entry is routed in the same route table (it must reach the Bundle's upstream
//! on a proxied route), classified, and planned by the same planner as the direct request it describes; all entries
//! share one set of facts, so each resource is read once however many entries name it. The entries' plans are
//! checked together before anything is sent: a transaction with one refused entry is refused whole; in a batch a
//! refused entry is answered in place. The entries that pass become one upstream Bundle, and each answer is
//! verified as its entry's plan says (`EntryCheck`).

use fhirgw_config::route::Action;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::write::FHIR_JSON;
use super::{Planned, Planner, Stop};
use crate::policy::batch::{self, Kind, entry_request, request_field};
use crate::policy::classify::{Interaction, classify};
use crate::policy::input::{Env, Input, RequestBody, Within};
use crate::policy::plan::{Answer, BatchExpect, Call, EntryCheck, EntryExpect, Expect, Payload, Step};
use crate::policy::query;
use crate::policy::refusal::Refusal;

/// `404 Not Found`: the canonical form of a status in a batch response.
pub fn status_line(status: StatusCode) -> String {
    format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or_default())
}

/// The response entry for an entry the gateway refused.
pub fn refused_entry(refusal: &Refusal) -> Value {
    let outcome = refusal.outcome();
    json!({ "response": { "status": status_line(outcome.status), "outcome": outcome.body() } })
}

impl Planner<'_> {
    pub(super) fn batch(&self) -> Planned {
        let bundle = self.resource_body("Bundle")?;
        let (kind, entries) = batch::parse(&bundle).map_err(|e| Refusal::bad_request(e.to_string()))?;
        let within = if kind == Kind::Transaction { Within::Transaction } else { Within::Batch };
        let mut needs = Vec::new();
        let mut outbound = Vec::new();
        let mut expects = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            match self.entry(entry, within) {
                Step::Need(queries) => needs.extend(queries),
                Step::Send(call) => match entry_check(&call.expect) {
                    Some(check) => {
                        outbound.push(self.outbound_entry(entry, call));
                        expects.push(EntryExpect::Forwarded(check));
                    }
                    None => {
                        let refusal = Refusal::forbidden("This is not supported inside a batch or transaction.");
                        self.refuse_entry(kind, index, refusal, &mut expects)?;
                    }
                },
                Step::Answer(Answer::EmptyBundle { .. }) => {
                    let empty = json!({"resourceType": "Bundle", "type": "searchset", "total": 0});
                    expects.push(EntryExpect::Answered(json!({"resource": empty, "response": {"status": "200 OK"}})));
                }
                Step::Answer(Answer::Batch { .. }) => {
                    let refusal = Refusal::forbidden("A batch inside a batch is not supported.");
                    self.refuse_entry(kind, index, refusal, &mut expects)?;
                }
                Step::Refuse(refusal) => self.refuse_entry(kind, index, refusal, &mut expects)?,
            }
        }
        if !needs.is_empty() {
            needs.sort();
            needs.dedup();
            return Err(Stop::Need(needs));
        }
        if outbound.is_empty() {
            let entries = expects
                .into_iter()
                .map(|e| match e {
                    EntryExpect::Answered(value) => value,
                    EntryExpect::Forwarded(_) => Value::Null,
                })
                .collect();
            return Ok(Step::Answer(Answer::Batch { kind: kind.response_type(), entries }));
        }
        let body = json!({ "resourceType": "Bundle", "type": bundle["type"], "entry": outbound });
        Ok(Step::Send(Call {
            method: Method::POST,
            target: self.target(&[], &[]),
            body: Some(Payload::Json { content_type: FHIR_JSON, value: body }),
            headers: Vec::new(),
            expect: Expect::Batch(BatchExpect { transaction: kind == Kind::Transaction, entries: expects }),
        }))
    }

    /// A refused entry: the whole transaction, or this entry of a batch (in place).
    fn refuse_entry(
        &self,
        kind: Kind,
        index: usize,
        refusal: Refusal,
        expects: &mut Vec<EntryExpect>,
    ) -> Result<(), Stop> {
        if kind == Kind::Transaction || !refusal.is_entry_level() {
            return Err(Refusal::Entry { index, refusal: Box::new(refusal) }.into());
        }
        expects.push(EntryExpect::Answered(refused_entry(&refusal)));
        Ok(())
    }

    /// Routes, classifies and plans one entry as the request it describes.
    fn entry(&self, entry: &Value, within: Within) -> Step {
        let request = match entry_request(entry, self.env.public) {
            Ok(request) => request,
            Err(message) => return Refusal::BadRequest(message).into(),
        };
        let Some(matched) = self.env.table.route(&request.method, &request.path) else {
            let known = self.env.table.path_known(&request.path);
            return if known { Refusal::MethodNotAllowed } else { Refusal::NoRoute }.into();
        };
        match &matched.route.action {
            Action::Proxy { upstream } if *upstream == self.env.upstream.name => {}
            Action::Deny { status, message } => {
                return Refusal::Denied { route: matched.route.id.clone(), status: *status, message: message.clone() }
                    .into();
            }
            _ => {
                return Refusal::forbidden(
                    "This entry is not served by the same server as the Bundle; send it on its own.",
                )
                .into();
            }
        }
        let interaction = classify(&request.method, &request.path, request.query.is_some());
        let supported = match &interaction {
            Interaction::Read { .. }
            | Interaction::VRead { .. }
            | Interaction::Create { .. }
            | Interaction::Update { .. }
            | Interaction::Patch { .. }
            | Interaction::Delete { .. } => true,
            Interaction::SearchType { post, .. } => !post,
            _ => false,
        };
        if !supported {
            let what = interaction.describe();
            return Refusal::forbidden(format!("{what} is not supported inside a batch or transaction.")).into();
        }
        let input = Input {
            method: request.method.clone(),
            head: request.method == Method::HEAD,
            interaction,
            handler: None,
            relative: request.path.clone(),
            params: query::parse(request.query.as_deref()),
            media: FHIR_JSON.to_owned(),
            body: entry.get("resource").map_or(RequestBody::None, |r| RequestBody::Json(r.clone())),
            if_match: request_field(entry, "ifMatch").map(str::to_owned),
            if_none_exist: request_field(entry, "ifNoneExist").map(str::to_owned),
            respond_async: false,
            xml_only: false,
            raw_accept: None,
            security_context: None,
            within,
        };
        // The entry's own route decides its query guard.
        let env = Env { guard: &matched.route.guard, ..*self.env };
        super::plan(&input, &env, self.access, self.facts)
    }

    /// The entry to send for an entry's planned call: the client's entry (its `fullUrl` kept, for the references
    /// between entries) with the checked URL, resource and preconditions.
    fn outbound_entry(&self, entry: &Value, call: Call) -> Value {
        let mut out = entry.clone();
        let base = self.env.upstream.base_path.trim_end_matches('/');
        let relative = call.target.strip_prefix(base).unwrap_or(&call.target).trim_start_matches('/').to_owned();
        out["request"]["url"] = Value::String(relative);
        if let Some(request) = out.get_mut("request").and_then(Value::as_object_mut) {
            request.remove("ifMatch");
            request.remove("ifNoneExist");
            request.remove("ifModifiedSince");
            request.remove("ifNoneMatch");
        }
        for (name, value) in &call.headers {
            let field = match name.as_str() {
                "if-match" => "ifMatch",
                "if-none-exist" => "ifNoneExist",
                _ => continue,
            };
            if let Ok(text) = value.to_str() {
                out["request"][field] = Value::String(text.to_owned());
            }
        }
        match call.body {
            Some(Payload::Json { value, .. }) => out["resource"] = value,
            // (A raw upload is never an entry's.)
            Some(Payload::BinaryUpload(_)) | None => {
                if let Some(obj) = out.as_object_mut() {
                    obj.remove("resource");
                }
            }
        }
        out
    }
}

/// How an entry's answer is checked, for the calls a batch entry may become.
fn entry_check(expect: &Expect) -> Option<EntryCheck> {
    match expect {
        Expect::Resource { ty, id, .. } => Some(EntryCheck::Read { ty: ty.clone(), id: id.clone() }),
        Expect::Bundle(_) => Some(EntryCheck::Search),
        Expect::Written { ty } => Some(EntryCheck::Write { ty: ty.clone() }),
        _ => None,
    }
}
