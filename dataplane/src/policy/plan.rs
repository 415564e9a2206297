//! What the planner decides for a request, one step at a time.
//!
//! The planner (`planner`) is a pure function of the request, the caller's access, the environment and the facts
//! read so far. It answers with a [`Step`]: refuse; read these facts first (a resource that must be visible, a
//! narrowed search that resolves a condition); send this one upstream call, whose answer is verified as [`Expect`]
//! says; or answer locally. The executor (`proxy::execute`) runs steps until one is final. Every request shape,
//! batch entries and handlers included, goes through the same planner, so no shape can skip a check.

use std::collections::HashMap;

use http::Method;
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;

use super::compartment::Reach;
use super::query::Params;
use super::refusal::Refusal;

#[derive(Debug)]
pub enum Step {
    /// Refused: nothing (more) is sent.
    Refuse(Refusal),
    /// These facts are needed first. Every query names a resource or a search already narrowed to the tenant.
    Need(Vec<Query>),
    /// The one upstream call the request becomes.
    Send(Call),
    /// Answered by the gateway itself.
    Answer(Answer),
}

impl From<Refusal> for Step {
    fn from(refusal: Refusal) -> Self {
        Step::Refuse(refusal)
    }
}

/// A read the planner needs before it can decide.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Query {
    /// `GET [type]/[id]` or `[type]/[id]/_history/[vid]`.
    Resource { ty: String, id: String, vid: Option<String> },
    /// `GET [type]?params`, the params already narrowed with the tenant's tags.
    Search { ty: String, params: Params },
    /// A Binary's metadata without its content (`GET Binary/[id]?_elements=contentType,securityContext`): its tags,
    /// version and security context, however large the content.
    BinaryMeta { id: String, vid: Option<String> },
}

impl Query {
    pub fn resource(ty: &str, id: &str) -> Self {
        Query::Resource { ty: ty.to_owned(), id: id.to_owned(), vid: None }
    }
}

/// What a [`Query`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// The resource as the upstream returned it; `None` when missing or gone.
    Resource(Option<Value>),
    /// The searchset as the upstream returned it.
    Bundle(Value),
}

/// The facts read so far for one request (a batch shares them across its entries).
#[derive(Debug, Default)]
pub struct Facts(HashMap<Query, Fact>);

impl Facts {
    pub fn get(&self, query: &Query) -> Option<&Fact> {
        self.0.get(query)
    }

    pub fn insert(&mut self, query: Query, fact: Fact) {
        self.0.insert(query, fact);
    }

    pub fn contains(&self, query: &Query) -> bool {
        self.0.contains_key(query)
    }

    /// Every fact read so far.
    pub fn iter(&self) -> impl Iterator<Item = (&Query, &Fact)> {
        self.0.iter()
    }

    /// The resource `query` read, if it was read: `Some(None)` when it is missing.
    pub fn resource(&self, query: &Query) -> Option<Option<&Value>> {
        match self.0.get(query)? {
            Fact::Resource(resource) => Some(resource.as_ref()),
            Fact::Bundle(_) => None,
        }
    }
}

/// The one upstream call a request becomes.
#[derive(Debug)]
pub struct Call {
    pub method: Method,
    /// Path and query on the upstream (its base path included).
    pub target: String,
    pub body: Option<Payload>,
    /// The gateway's own request headers (`If-Match` on the checked version, a narrowed `If-None-Exist`,
    /// `Prefer: respond-async`, an `Accept` other than FHIR JSON). The client's allow-listed ones come first.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub expect: Expect,
}

impl Call {
    pub fn get(target: String, expect: Expect) -> Self {
        Call { method: Method::GET, target, body: None, headers: Vec::new(), expect }
    }
}

/// A request body the gateway sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON document of this media type.
    Json { content_type: &'static str, value: Value },
    /// A Binary resource, checked, whose `data` is the client's raw request body: base64-encoded while it streams
    /// through, never held whole.
    BinaryUpload(Value),
}

/// How the upstream's answer to a [`Call`] is checked before anything reaches the client.
#[derive(Debug, PartialEq)]
pub enum Expect {
    /// One resource `ty/id`: inside the grants and within `reach`, or the one 404.
    Resource { ty: String, id: String, reach: Reach, head: bool },
    /// A Bundle, streamed and verified entry by entry.
    Bundle(BundleExpect),
    /// A write's answer: a returned resource passes only if visible; locations are made public.
    Written { ty: String },
    /// `$meta-add` / `$meta-delete`: the `Parameters` answer.
    MetaParameters { operation: String },
    /// A batch or transaction response, verified entry by entry.
    Batch(BatchExpect),
    /// The CapabilityStatement, rewritten for the gateway.
    Capabilities,
    /// A bulk export kick-off: the status URL becomes a signed link.
    ExportKickOff,
    /// Polling an export: progress or the manifest, rewritten with signed file links.
    ExportStatus,
    /// Cancelling an export.
    ExportCancel,
    /// A Binary's raw content, of the version checked: streamed through as the upstream sends it.
    BinaryContent { head: bool },
    /// A raw Binary upload's answer: its status, `Location` and `ETag`. A body (the content again, as base64 JSON)
    /// is not read.
    Uploaded,
    /// An export file: NDJSON lines of the declared type, each verified.
    ExportFile { declared: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleExpect {
    /// The gateway path (relative to the base) its page links continue, e.g. `Observation`.
    pub path: String,
    /// The public URL of the request, for `self`.
    pub self_url: String,
    /// Narrowed upstream with the tenant's tags: its `total` may be kept, and its page tokens say so.
    pub narrowed: bool,
    pub head: bool,
}

/// What each entry of a batch or transaction response must satisfy.
#[derive(Debug, PartialEq)]
pub struct BatchExpect {
    pub transaction: bool,
    pub entries: Vec<EntryExpect>,
}

#[derive(Debug, PartialEq)]
pub enum EntryExpect {
    /// Forwarded; its response entry is checked.
    Forwarded(EntryCheck),
    /// Answered by the gateway in place (a refusal, an empty search).
    Answered(Value),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryCheck {
    /// A read of `ty/id`: the resource must be visible, else the entry looks like a missing resource.
    Read { ty: String, id: String },
    /// A search: the nested searchset is filtered, links dropped.
    Search,
    /// A write: a returned resource is kept only if visible.
    Write { ty: String },
}

/// Answered by the gateway without the upstream.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// A search or history that can only be empty (the tenant holds no dataset).
    EmptyBundle { kind: &'static str, self_url: String, head: bool },
    /// A batch or transaction whose every entry the gateway answered itself.
    Batch { kind: &'static str, entries: Vec<Value> },
}
