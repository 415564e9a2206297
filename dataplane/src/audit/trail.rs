//! One request's audit record, filled in as the pipeline learns: the caller, the route, the interaction, the input,
//! the planner's final step (the upstream call it became, or its refusal) and what the executor verified, then
//! turned into events once the outcome is known ([`Trail::events`]).
//!
//! Every hook is a no-op once the request is known not to be recorded (its tenant and route audit nothing), so an
//! unaudited request pays a flag check per hook.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fhirgw_config::audit::{AuditInteraction, AuditMode, AuditPolicy, effective};
use fhirgw_config::route::{Handler, Route};
use http::{HeaderMap, Method, StatusCode, header};
use serde_json::Value;

use super::describe::{self, Entry, merge, patients_in_params, query_form};
use super::event::{self, Context, Outcome, Who};
use crate::authn::Caller;
use crate::policy::classify::Interaction;
use crate::policy::compartment::{self, Reach};
use crate::policy::input::{Env, Input, RequestBody};
use crate::policy::plan::{Answer, Expect, Fact, Facts, Step};
use crate::policy::verify::{Grants, resource_visible};

/// What the pipeline learned about one request.
#[derive(Debug, Default)]
struct Record {
    method: Method,
    /// The request target (a clone shares the request's bytes: nothing is copied).
    uri: http::Uri,
    client: Option<IpAddr>,
    request_id: Option<String>,
    public: Option<String>,
    /// The authenticated caller (shared with the token cache).
    caller: Option<Arc<Caller>>,
    /// The caller's tenant's policy, once a caller is known.
    tenant: Option<AuditPolicy>,
    route: Option<AuditPolicy>,
    interaction: Option<(Interaction, Option<Handler>, Vec<String>)>,
    /// From the input: one act, or a batch's entries.
    acts: Option<Vec<Entry>>,
    /// The upstream call the plan became, in words.
    executed: Option<String>,
    /// Patients the executed call was confined to (its parameters, a `patient/` reach).
    confined: Vec<String>,
    /// Resources seen (facts read, answers verified): type, id, the patients they concern.
    seen: Vec<(String, String, Vec<String>)>,
    /// Resources that exist but were answered as missing (outside the grants or the patient's compartment).
    hidden: Vec<(String, String)>,
    /// The refusal the planner decided, in words.
    refusal: Option<String>,
    /// A batch's answers, entry by entry: status and location.
    entry_results: Option<Vec<(u16, Option<String>)>>,
}

/// One request's audit record (see the module docs).
#[derive(Debug)]
pub struct Trail {
    /// False once the request is known not to be recorded.
    active: AtomicBool,
    /// Refused (503) by the strict admission check: counted there, not again if its own event cannot be written.
    unrecordable: AtomicBool,
    /// Whether the data plane keeps a spool (else only the mode is decided: strict fails closed).
    spooled: bool,
    started: SystemTime,
    record: Mutex<Record>,
    /// Admitted in strict mode: the writer expects its event (a commit delay waits for it).
    expected: Mutex<Option<super::writer::Expected>>,
}

impl Trail {
    pub(super) fn new(
        spooled: bool,
        method: &Method,
        uri: &http::Uri,
        client: Option<IpAddr>,
        id: Option<&str>,
    ) -> Self {
        // Without a spool nothing is written: only what decides the mode (tenant, route, interaction) is kept.
        let record = if spooled {
            Record {
                method: method.clone(),
                uri: uri.clone(),
                client,
                request_id: id.map(str::to_owned),
                ..Record::default()
            }
        } else {
            Record { method: method.clone(), ..Record::default() }
        };
        Trail {
            active: AtomicBool::new(true),
            unrecordable: AtomicBool::new(false),
            spooled,
            started: SystemTime::now(),
            record: Mutex::new(record),
            expected: Mutex::new(None),
        }
    }

    pub(super) fn expect(&self, expected: super::writer::Expected) {
        if let Ok(mut slot) = self.expected.lock() {
            *slot = Some(expected);
        }
    }

    pub(super) fn take_expected(&self) -> Option<super::writer::Expected> {
        self.expected.lock().ok().and_then(|mut slot| slot.take())
    }

    pub(super) fn refused_unrecordable(&self) {
        self.unrecordable.store(true, Ordering::Relaxed);
    }

    pub(super) fn was_refused_unrecordable(&self) -> bool {
        self.unrecordable.load(Ordering::Relaxed)
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn with(&self, f: impl FnOnce(&mut Record)) {
        if self.active() {
            let mut record = self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut record);
        }
    }

    pub fn public_base(&self, public: &str) {
        if self.spooled {
            self.with(|r| r.public = Some(public.to_owned()));
        }
    }

    pub fn interaction(&self, interaction: &Interaction, relative: &[String]) {
        let relative = if self.spooled { relative.to_vec() } else { Vec::new() };
        self.with(|r| r.interaction = Some((interaction.clone(), None, relative)));
    }

    /// The route's handler, if it has one.
    pub fn handler(&self, handler: Option<Handler>) {
        if handler.is_some() {
            self.with(|r| {
                if let Some((_, h, _)) = r.interaction.as_mut() {
                    *h = handler;
                }
            });
        }
    }

    /// The authenticated caller and its tenant's policy.
    pub fn caller(&self, caller: &Arc<Caller>, tenant: Option<&fhirgw_config::tenant::Tenant>) {
        self.with(|r| {
            r.tenant = Some(tenant.map(|t| t.audit).unwrap_or_default());
            if !self.spooled {
                return;
            }
            r.caller = Some(caller.clone());
        });
    }

    /// The route matched (or, for a request refused before routing, the route it would have matched).
    pub fn route(&self, route: &Route) {
        self.with(|r| r.route = Some(route.audit));
    }

    /// The most this request can be recorded with, once the caller (or its absence) and the route are known; stops
    /// the trail when that is nothing. A batch counts with its tenant's and route's mode: its entries decide later.
    pub fn mode(&self, unauthenticated_refusal: AuditMode) -> AuditMode {
        if !self.active() {
            return AuditMode::Off;
        }
        let record = self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let category = match &record.interaction {
            Some((interaction, handler, _)) => describe::category(interaction, *handler),
            None => Some(AuditInteraction::Operation),
        };
        let fallback = if record.tenant.is_none() { unauthenticated_refusal } else { AuditMode::Off };
        let mode = match category {
            Some(category) => effective(record.tenant.as_ref(), record.route.as_ref(), fallback, category),
            None => AuditInteraction::ALL
                .iter()
                .map(|c| effective(record.tenant.as_ref(), record.route.as_ref(), fallback, *c))
                .max()
                .unwrap_or(AuditMode::Off),
        };
        drop(record);
        if mode == AuditMode::Off && self.record_is_settled() {
            self.active.store(false, Ordering::Relaxed);
        }
        mode
    }

    /// A caller and a route are known: nothing later can turn recording on.
    fn record_is_settled(&self) -> bool {
        let record = self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        record.tenant.is_some() && record.route.is_some()
    }

    /// The request as read: the act (or the batch's entries) it is, with its query form and the patients it names.
    pub fn input(&self, input: &Input, env: &Env<'_>) {
        self.with(|r| {
            let public = env.public;
            if input.interaction == Interaction::BatchOrTransaction && input.handler.is_none() {
                // An empty Bundle (or none that parses) is recorded as the request itself.
                if let RequestBody::Json(bundle) = &input.body
                    && let Some(entries) = describe::entries(bundle, env.table, public).filter(|e| !e.is_empty())
                {
                    r.acts = Some(entries);
                }
                return;
            }
            let mut act = describe::act(&input.interaction, input.handler, &input.method, &input.relative);
            if act.query.is_some() {
                let form = match &input.body {
                    RequestBody::Form(params) => Some(crate::policy::query::encode(params)),
                    _ => None,
                };
                act.query = Some(query_form(&input.method, public, &input.relative, r.uri.query(), form.as_deref()));
            }
            if let Some(ty) = input.relative.first() {
                act.patients = merge(act.patients, patients_in_params(ty, &input.params));
            }
            if let RequestBody::Json(body) = &input.body {
                act.patients = merge(act.patients, compartment::patients_of(body));
                act.patients = merge(act.patients, parameters_patients(body));
            }
            r.acts = Some(vec![Entry { act, route: r.route }]);
        });
    }

    /// The planner's final step (and the facts it was decided on, with the grants they were judged by).
    pub fn step(&self, step: &Step, facts: &Facts, upstream_base: &str, grants: &Grants) {
        self.with(|r| {
            for (query, fact) in facts.iter() {
                if let (crate::policy::plan::Query::Resource { ty, id, .. }, Fact::Resource(Some(resource))) =
                    (query, fact)
                {
                    r.seen.push((ty.clone(), id.clone(), compartment::patients_of(resource)));
                }
            }
            match step {
                Step::Send(call) => {
                    let relative = call.target.strip_prefix(upstream_base).unwrap_or(&call.target);
                    let relative = relative.trim_start_matches('/');
                    let (path, query) = relative.split_once('?').map_or((relative, None), |(p, q)| (p, Some(q)));
                    let mut executed = format!("{} {path}", call.method);
                    if let Some(query) = query {
                        executed.push('?');
                        executed.push_str(&describe::redact(query));
                        if let Some(ty) = path.split('/').next() {
                            r.confined = patients_in_params(ty, &crate::policy::query::parse(Some(query)));
                        }
                    }
                    if let Expect::Resource { reach: Reach::Patient(patient), .. } = &call.expect {
                        r.confined = merge(std::mem::take(&mut r.confined), vec![patient.clone()]);
                    }
                    r.executed = Some(executed);
                }
                Step::Refuse(refusal) => {
                    r.refusal = Some(refusal.to_string());
                    // A resource the facts show exists outside the grants was hidden, not missing.
                    for (query, fact) in facts.iter() {
                        if let (crate::policy::plan::Query::Resource { ty, id, .. }, Fact::Resource(Some(resource))) =
                            (query, fact)
                            && !resource_visible(resource, ty, id, grants)
                        {
                            r.hidden.push((ty.clone(), id.clone()));
                        }
                    }
                }
                Step::Answer(Answer::Batch { entries, .. }) => r.entry_results = Some(results(entries)),
                Step::Answer(_) | Step::Need(_) => {}
            }
        });
    }

    /// A single resource the upstream answered: the patients it concerns; whether it was shown.
    pub fn answered(&self, ty: &str, id: &str, resource: Option<&Value>, shown: bool) {
        self.with(|r| {
            if let Some(resource) = resource {
                r.seen.push((ty.to_owned(), id.to_owned(), compartment::patients_of(resource)));
                if !shown {
                    r.hidden.push((ty.to_owned(), id.to_owned()));
                }
            }
        });
    }

    /// Whether a verified answer's patients are wanted (a read of a type in the compartment other than Patient).
    pub fn wants_patients(&self, ty: &str) -> bool {
        self.active() && ty != "Patient" && compartment::search_param(ty, "x").is_some()
    }

    /// A batch's answer as the client gets it, entry by entry; `hidden` lists entries answered as missing although
    /// the resource exists.
    pub fn entries(&self, entries: &[Value], hidden: &[(String, String)]) {
        self.with(|r| {
            r.entry_results = Some(results(entries));
            r.hidden.extend(hidden.iter().cloned());
            for entry in entries {
                if let Some(resource) = entry.get("resource")
                    && let (Some(ty), Some(id)) = (
                        resource.get("resourceType").and_then(Value::as_str),
                        resource.get("id").and_then(Value::as_str),
                    )
                {
                    r.seen.push((ty.to_owned(), id.to_owned(), compartment::patients_of(resource)));
                }
            }
        });
    }

    /// The events to record, each with the mode it needs, into `out`, now that the outcome is known. `error` is the
    /// failure in words, for operators.
    #[allow(clippy::too_many_arguments)]
    pub fn events(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        error: Option<&(dyn std::fmt::Display + Sync)>,
        trace_id: Option<String>,
        node: &str,
        unauthenticated: AuditMode,
        out: &mut super::Events,
    ) {
        if !self.active() {
            return;
        }
        let mut record = self.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = &mut *record;
        let fallback = if record.tenant.is_none() && status.as_u16() >= 400 { unauthenticated } else { AuditMode::Off };
        let acts = record.acts.take();
        let record = &*record;
        let public = record.public.as_deref().unwrap_or("urn:fhirgw:unknown-base");
        let entries = acts.unwrap_or_else(|| {
            let mut act = match &record.interaction {
                Some((interaction, handler, relative)) => {
                    describe::act(interaction, *handler, &record.method, relative)
                }
                None => describe::act(&Interaction::Unknown, None, &record.method, &[]),
            };
            if act.query.is_some() {
                act.query = Some(match &record.interaction {
                    Some((_, _, relative)) => query_form(&record.method, public, relative, record.uri.query(), None),
                    // Not even classified (an irregular path): the request target as received.
                    None => match record.uri.query() {
                        Some(q) => format!("{} {}?{}", record.method, record.uri.path(), describe::redact(q)),
                        None => format!("{} {}", record.method, record.uri.path()),
                    },
                });
            }
            vec![Entry { act, route: record.route }]
        });
        let batch = entries.first().is_some_and(|e| e.act.entry.is_some());
        let made_up;
        let transaction = match record.request_id.as_deref().or(trace_id.as_deref()) {
            Some(id) => id,
            None => {
                made_up = super::new_id();
                &made_up
            }
        };
        let context = Context {
            recorded: self.started,
            client: record.client.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            public_base: public,
            node,
            transaction,
            trace_id: trace_id.as_deref(),
        };
        let location = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let version = headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned());
        for (index, Entry { mut act, route }) in entries.into_iter().enumerate() {
            let mode =
                effective(record.tenant.as_ref(), route.as_ref().or(record.route.as_ref()), fallback, act.category);
            if mode == AuditMode::Off {
                continue;
            }
            let (code, entry_location) = match &record.entry_results {
                Some(results) if batch => results.get(index).cloned().unwrap_or((status.as_u16(), None)),
                _ => (status.as_u16(), None),
            };
            let location = if batch { entry_location } else { location.clone() };
            if let Some((ty, id, vid)) = act.resource.as_mut() {
                if let Some((lty, lid, lvid)) = location.as_deref().and_then(|l| parse_location(l, public)) {
                    if lty == *ty && id.as_ref().is_none_or(|i| *i == lid) {
                        *id = Some(lid);
                        *vid = lvid.or(vid.take());
                    }
                } else if !batch && (200..300).contains(&code) && vid.is_none() && act.action != event::Action::Read {
                    *vid = version.clone();
                }
            }
            let key = act.resource.as_ref().and_then(|(ty, id, _)| id.as_ref().map(|id| (ty.clone(), id.clone())));
            if let Some((ty, id)) = &key {
                for (sty, sid, patients) in &record.seen {
                    if sty == ty && sid == id {
                        act.patients = merge(std::mem::take(&mut act.patients), patients.clone());
                    }
                }
            }
            if !batch {
                act.patients = merge(std::mem::take(&mut act.patients), record.confined.clone());
                act.executed = record.executed.clone();
            }
            let hidden = code == 404 && key.as_ref().is_some_and(|k| record.hidden.contains(k));
            let detail = if hidden {
                Some("the resource exists but is outside the caller's grants or patient compartment; answered as missing".to_owned())
            } else if code >= 400 {
                record.refusal.clone().or_else(|| error.map(ToString::to_string))
            } else {
                None
            };
            let outcome = Outcome { status: code, detail };
            let who = record.caller.as_deref().map(|c| Who {
                tenant: &c.tenant,
                subject: &c.subject,
                client_id: c.client_id.as_deref(),
                issuer: Some(c.issuer.as_str()).filter(|i| !i.is_empty()),
            });
            let who = who.as_ref();
            let patients: Vec<Option<&str>> = if act.patients.is_empty() {
                vec![None]
            } else {
                act.patients.iter().map(|p| Some(p.as_str())).collect()
            };
            for patient in patients {
                out.push(mode, |bytes| event::write(bytes, &super::new_id(), &context, who, &act, &outcome, patient));
            }
        }
    }
}

/// Patients a `Parameters` body names (`$export`'s `patient`, `$docref`'s `patient`).
fn parameters_patients(body: &Value) -> Vec<String> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Vec::new();
    }
    let params = body.get("parameter").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut out = Vec::new();
    for p in params.iter().filter(|p| p.get("name").and_then(Value::as_str) == Some("patient")) {
        let id = p
            .get("valueReference")
            .and_then(|r| r.get("reference"))
            .and_then(Value::as_str)
            .and_then(compartment::patient_id)
            .or_else(|| p.get("valueId").or_else(|| p.get("valueString")).and_then(Value::as_str));
        if let Some(id) = id.filter(|id| fhirgw_config::pattern::Class::Id.accepts(id)) {
            out.push(id.to_owned());
        }
    }
    merge(Vec::new(), out)
}

/// A response entry's status code and location.
fn results(entries: &[Value]) -> Vec<(u16, Option<String>)> {
    entries
        .iter()
        .map(|e| {
            let response = e.get("response");
            let status = response
                .and_then(|r| r.get("status"))
                .and_then(Value::as_str)
                .and_then(|s| s.get(..3))
                .and_then(|c| c.parse().ok())
                .unwrap_or(502);
            let location = response.and_then(|r| r.get("location")).and_then(Value::as_str).map(str::to_owned);
            (status, location)
        })
        .collect()
}

/// `Type`, `id` and version of a location on the public base (`…/Patient/1/_history/2`).
fn parse_location(location: &str, public: &str) -> Option<(String, String, Option<String>)> {
    let rest = location.strip_prefix(public).unwrap_or(location).trim_start_matches('/');
    let mut parts = rest.split('/');
    let (ty, id) = (parts.next()?, parts.next()?);
    let vid = match (parts.next(), parts.next()) {
        (Some("_history"), Some(v)) => Some(v.to_owned()),
        _ => None,
    };
    Some((ty.to_owned(), id.to_owned(), vid))
}
