//! Names of the interactions the classifier tells apart, for span attributes and logs: static strings that carry no
//! type, id or operation name from the request. (Kept outside `policy/` while that is being restructured.)

use http::Method;

use crate::policy::classify::Interaction;

impl Interaction {
    /// The FHIR RESTful interaction, as in the FHIR `restful-interaction` code system where one fits.
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
}

#[cfg(test)]
mod tests {
    use crate::policy::classify::classify;

    use super::*;

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
