//! What kind of FHIR interaction a request is, from its method and normalised path (relative to the FHIR base).
//! Everything the gateway cannot place is `Unknown` and is denied.

use fhirgw_config::pattern::Class;
use http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interaction {
    /// `GET metadata`.
    Capabilities,
    Read {
        ty: String,
        id: String,
    },
    VRead {
        ty: String,
        id: String,
        vid: String,
    },
    /// `GET [type]` or `POST [type]/_search`.
    SearchType {
        ty: String,
        post: bool,
    },
    /// `GET [base]?…` or `POST [base]/_search`.
    SearchSystem,
    /// `GET [type]/[id]/[type2]`.
    Compartment {
        ty: String,
        id: String,
        target: String,
    },
    HistoryInstance {
        ty: String,
        id: String,
    },
    HistoryType {
        ty: String,
    },
    HistorySystem,
    Create {
        ty: String,
    },
    Update {
        ty: String,
        id: String,
    },
    Patch {
        ty: String,
        id: String,
    },
    Delete {
        ty: String,
        id: String,
    },
    /// Conditional update / patch / delete on a type (`PUT Patient?identifier=…`).
    Conditional {
        ty: String,
        method: Method,
    },
    /// `POST [base]` with a batch or transaction Bundle.
    BatchOrTransaction,
    /// `[type]/[id]/$op`, `[type]/$op` or `$op`.
    Operation {
        ty: Option<String>,
        id: Option<String>,
        name: String,
    },
    Unknown,
}

impl Interaction {
    /// The interaction's name, for logs, metrics and span attributes: FHIR's code where it has one (`read`,
    /// `search-type`, `history-instance`, …), else the gateway's own (`search-compartment`, `conditional`, `operation`).
    pub fn name(&self) -> &'static str {
        match self {
            Interaction::Capabilities => "capabilities",
            Interaction::Read { .. } => "read",
            Interaction::VRead { .. } => "vread",
            Interaction::SearchType { .. } => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::Compartment { .. } => "search-compartment",
            Interaction::HistoryInstance { .. } => "history-instance",
            Interaction::HistoryType { .. } => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::Create { .. } => "create",
            Interaction::Update { .. } => "update",
            Interaction::Patch { .. } => "patch",
            Interaction::Delete { .. } => "delete",
            Interaction::Conditional { method, .. } => match *method {
                Method::PUT => "conditional-update",
                Method::PATCH => "conditional-patch",
                Method::DELETE => "conditional-delete",
                _ => "conditional",
            },
            Interaction::BatchOrTransaction => "batch-or-transaction",
            Interaction::Operation { .. } => "operation",
            Interaction::Unknown => "unknown",
        }
    }

    /// The interaction in words, for refusals.
    pub fn describe(&self) -> String {
        match self {
            Interaction::Compartment { .. } => "Compartment search".into(),
            Interaction::HistorySystem => "System-level history".into(),
            Interaction::Conditional { .. } => "A conditional write".into(),
            Interaction::BatchOrTransaction => "A batch or transaction".into(),
            Interaction::Operation { name, .. } => format!("The operation {name}"),
            _ => "This request".into(),
        }
    }
}

fn is_type(s: &str) -> bool {
    Class::Type.accepts(s)
}

fn is_id(s: &str) -> bool {
    Class::Id.accepts(s)
}

fn is_op(s: &str) -> bool {
    Class::Operation.accepts(s)
}

pub fn classify(method: &Method, path: &[String], has_query: bool) -> Interaction {
    use Interaction::*;
    let m = method.clone();
    let segs: Vec<&str> = path.iter().map(String::as_str).collect();
    let get = m == Method::GET || m == Method::HEAD;
    let s = |v: &str| v.to_owned();
    match segs.as_slice() {
        [] if get => SearchSystem,
        [] if m == Method::POST => BatchOrTransaction,
        ["metadata"] if get => Capabilities,
        ["_search"] if m == Method::POST => SearchSystem,
        ["_history"] if get => HistorySystem,
        [op] if is_op(op) && (get || m == Method::POST) => Operation { ty: None, id: None, name: s(op) },
        [ty] if is_type(ty) => match m {
            _ if get => SearchType { ty: s(ty), post: false },
            Method::POST => Create { ty: s(ty) },
            Method::PUT | Method::PATCH | Method::DELETE if has_query => Conditional { ty: s(ty), method: m },
            _ => Unknown,
        },
        [ty, "_search"] if is_type(ty) && m == Method::POST => SearchType { ty: s(ty), post: true },
        [ty, "_history"] if is_type(ty) && get => HistoryType { ty: s(ty) },
        [ty, op] if is_type(ty) && is_op(op) && (get || m == Method::POST) => {
            Operation { ty: Some(s(ty)), id: None, name: s(op) }
        }
        [ty, id] if is_type(ty) && is_id(id) => match m {
            _ if get => Read { ty: s(ty), id: s(id) },
            Method::PUT => Update { ty: s(ty), id: s(id) },
            Method::PATCH => Patch { ty: s(ty), id: s(id) },
            Method::DELETE => Delete { ty: s(ty), id: s(id) },
            _ => Unknown,
        },
        [ty, id, "_history"] if is_type(ty) && is_id(id) && get => HistoryInstance { ty: s(ty), id: s(id) },
        [ty, id, "_history", vid] if is_type(ty) && is_id(id) && is_id(vid) && get => {
            VRead { ty: s(ty), id: s(id), vid: s(vid) }
        }
        [ty, id, op] if is_type(ty) && is_id(id) && is_op(op) && (get || m == Method::POST) => {
            Operation { ty: Some(s(ty)), id: Some(s(id)), name: s(op) }
        }
        [ty, id, target] if is_type(ty) && is_id(id) && is_type(target) && get => {
            Compartment { ty: s(ty), id: s(id), target: s(target) }
        }
        _ => Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Interaction::*;

    fn c(method: Method, path: &str, query: bool) -> Interaction {
        let segs: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        classify(&method, &segs, query)
    }

    #[test]
    fn classification_table() {
        let t = |v: &str| v.to_owned();
        let cases: Vec<(Method, &str, bool, Interaction)> = vec![
            (Method::GET, "/metadata", false, Capabilities),
            (Method::GET, "/", true, SearchSystem),
            (Method::POST, "/", false, BatchOrTransaction),
            (Method::POST, "/_search", false, SearchSystem),
            (Method::GET, "/_history", false, HistorySystem),
            (Method::GET, "/$export", false, Operation { ty: None, id: None, name: t("$export") }),
            (Method::GET, "/Patient", true, SearchType { ty: t("Patient"), post: false }),
            (Method::HEAD, "/Patient", false, SearchType { ty: t("Patient"), post: false }),
            (Method::POST, "/Patient/_search", false, SearchType { ty: t("Patient"), post: true }),
            (Method::POST, "/Patient", false, Create { ty: t("Patient") }),
            (Method::PUT, "/Patient", true, Conditional { ty: t("Patient"), method: Method::PUT }),
            (Method::DELETE, "/Patient", true, Conditional { ty: t("Patient"), method: Method::DELETE }),
            (Method::PUT, "/Patient", false, Unknown),
            (Method::GET, "/Patient/_history", false, HistoryType { ty: t("Patient") }),
            (
                Method::GET,
                "/Patient/$export",
                false,
                Operation { ty: Some(t("Patient")), id: None, name: t("$export") },
            ),
            (Method::GET, "/Patient/1", false, Read { ty: t("Patient"), id: t("1") }),
            (Method::PUT, "/Patient/1", false, Update { ty: t("Patient"), id: t("1") }),
            (Method::PATCH, "/Patient/1", false, Patch { ty: t("Patient"), id: t("1") }),
            (Method::DELETE, "/Patient/1", false, Delete { ty: t("Patient"), id: t("1") }),
            (Method::POST, "/Patient/1", false, Unknown),
            (Method::GET, "/Patient/1/_history", false, HistoryInstance { ty: t("Patient"), id: t("1") }),
            (Method::GET, "/Patient/1/_history/2", false, VRead { ty: t("Patient"), id: t("1"), vid: t("2") }),
            (
                Method::GET,
                "/Patient/1/$everything",
                false,
                Operation { ty: Some(t("Patient")), id: Some(t("1")), name: t("$everything") },
            ),
            (
                Method::GET,
                "/Patient/1/Observation",
                false,
                Compartment { ty: t("Patient"), id: t("1"), target: t("Observation") },
            ),
            (Method::GET, "/patient/1", false, Unknown),
            (Method::GET, "/Patient/1/_history/2/x", false, Unknown),
            (Method::GET, "/Patient/a b", false, Unknown),
            (Method::OPTIONS, "/Patient", false, Unknown),
            (
                Method::GET,
                "/Patient/$meta-add",
                false,
                Operation { ty: Some(t("Patient")), id: None, name: t("$meta-add") },
            ),
        ];
        for (method, path, query, want) in cases {
            assert_eq!(c(method.clone(), path, query), want, "{method} {path}");
        }
    }

    #[test]
    fn names_carry_nothing_from_the_request() {
        let cases: &[(Method, &str, bool, &str)] = &[
            (Method::GET, "metadata", false, "capabilities"),
            (Method::GET, "Patient/p1", false, "read"),
            (Method::GET, "Patient/p1/_history/2", false, "vread"),
            (Method::GET, "Patient", true, "search-type"),
            (Method::POST, "Patient/_search", false, "search-type"),
            (Method::GET, "", true, "search-system"),
            (Method::GET, "Patient/p1/Observation", false, "search-compartment"),
            (Method::GET, "Patient/p1/_history", false, "history-instance"),
            (Method::GET, "Patient/_history", false, "history-type"),
            (Method::GET, "_history", false, "history-system"),
            (Method::POST, "Patient", false, "create"),
            (Method::PUT, "Patient/p1", false, "update"),
            (Method::PATCH, "Patient/p1", false, "patch"),
            (Method::DELETE, "Patient/p1", false, "delete"),
            (Method::PUT, "Patient", true, "conditional-update"),
            (Method::PATCH, "Patient", true, "conditional-patch"),
            (Method::DELETE, "Patient", true, "conditional-delete"),
            (Method::POST, "", false, "batch-or-transaction"),
            (Method::GET, "Patient/p1/$everything", false, "operation"),
            (Method::PUT, "Patient", false, "unknown"),
        ];
        for (method, path, query, want) in cases {
            let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
            assert_eq!(classify(method, &segments, *query).name(), *want, "{method} {path}");
        }
    }
}
