//! The Patient compartment, for SMART `patient/` scopes: a caller whose token says `patient: 123` sees, of the types
//! a `patient/` scope names, only resources in Patient/123's compartment.
//!
//! Searches are confined upstream with the type's patient search parameter, and every resource that comes back is
//! checked here as well (membership is read off the resource's own reference elements), so a server that ignores the
//! parameter still leaks nothing. Types outside the table are not in the compartment: a `patient/` scope on them
//! grants nothing. The table follows the R4 Patient CompartmentDefinition, restricted to the elements that name the
//! patient as the subject of the record (not, say, the performer).

use serde_json::Value;

/// How far a caller's scopes reach for one interaction on one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Everything of the tenant's (`user/`, `system/`).
    Tenant,
    /// Only Patient/`0`'s compartment (`patient/`).
    Patient(String),
}

impl Reach {
    pub fn admits(&self, resource: &Value) -> bool {
        match self {
            Reach::Tenant => true,
            Reach::Patient(patient) => contains(resource, patient),
        }
    }
}

/// Type → (search parameter that confines a search to one patient, elements whose reference names the patient).
const TABLE: &[(&str, &str, &[&str])] = &[
    ("Account", "patient", &["subject"]),
    ("AllergyIntolerance", "patient", &["patient"]),
    ("CarePlan", "patient", &["subject"]),
    ("CareTeam", "patient", &["subject"]),
    ("Claim", "patient", &["patient"]),
    ("ClinicalImpression", "patient", &["subject"]),
    ("Communication", "patient", &["subject"]),
    ("Composition", "patient", &["subject"]),
    ("Condition", "patient", &["subject"]),
    ("Consent", "patient", &["patient"]),
    ("Coverage", "patient", &["beneficiary"]),
    ("DetectedIssue", "patient", &["patient"]),
    ("DeviceRequest", "patient", &["subject"]),
    ("DiagnosticReport", "patient", &["subject"]),
    ("DocumentReference", "patient", &["subject"]),
    ("Encounter", "patient", &["subject"]),
    ("EpisodeOfCare", "patient", &["patient"]),
    ("ExplanationOfBenefit", "patient", &["patient"]),
    ("FamilyMemberHistory", "patient", &["patient"]),
    ("Flag", "patient", &["subject"]),
    ("Goal", "patient", &["subject"]),
    ("ImagingStudy", "patient", &["subject"]),
    ("Immunization", "patient", &["patient"]),
    ("List", "patient", &["subject"]),
    ("MedicationAdministration", "patient", &["subject"]),
    ("MedicationDispense", "patient", &["subject"]),
    ("MedicationRequest", "patient", &["subject"]),
    ("MedicationStatement", "patient", &["subject"]),
    ("NutritionOrder", "patient", &["patient"]),
    ("Observation", "patient", &["subject"]),
    ("Procedure", "patient", &["subject"]),
    ("QuestionnaireResponse", "patient", &["subject"]),
    ("RiskAssessment", "patient", &["subject"]),
    ("ServiceRequest", "patient", &["subject"]),
    ("Specimen", "patient", &["subject"]),
];

/// The search parameter and value that confine a search on `ty` to Patient/`patient`'s compartment; `None` when
/// `ty` has no place in the compartment.
pub fn search_param(ty: &str, patient: &str) -> Option<(String, String)> {
    if ty == "Patient" {
        return Some(("_id".into(), patient.to_owned()));
    }
    TABLE.iter().find(|(t, _, _)| *t == ty).map(|(_, param, _)| ((*param).to_owned(), format!("Patient/{patient}")))
}

/// Whether a reference (`Patient/123`, `Patient/123/_history/2`, or absolute `…/Patient/123`) names the patient.
fn names_patient(reference: &str, patient: &str) -> bool {
    let unversioned = reference.split("/_history/").next().unwrap_or_default();
    let want = format!("Patient/{patient}");
    unversioned == want || unversioned.ends_with(&format!("/{want}"))
}

/// Whether `resource` is in Patient/`patient`'s compartment.
pub fn contains(resource: &Value, patient: &str) -> bool {
    let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else { return false };
    if ty == "Patient" {
        return resource.get("id").and_then(Value::as_str) == Some(patient);
    }
    let Some((_, _, elements)) = TABLE.iter().find(|(t, _, _)| *t == ty) else { return false };
    elements.iter().any(|element| {
        let refers = |v: &Value| v.get("reference").and_then(Value::as_str).is_some_and(|r| names_patient(r, patient));
        match resource.get(*element) {
            Some(Value::Array(items)) => items.iter().any(refers),
            Some(v) => refers(v),
            None => false,
        }
    })
}

/// The ids of the patients whose compartment `resource` is in, as read off the same elements (for the audit trail).
pub fn patients_of(resource: &Value) -> Vec<String> {
    let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else { return Vec::new() };
    if ty == "Patient" {
        return resource.get("id").and_then(Value::as_str).map(|id| vec![id.to_owned()]).unwrap_or_default();
    }
    let Some((_, _, elements)) = TABLE.iter().find(|(t, _, _)| *t == ty) else { return Vec::new() };
    let mut out: Vec<String> = Vec::new();
    for element in *elements {
        let items = match resource.get(*element) {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(v) => vec![v],
            None => Vec::new(),
        };
        for reference in items.into_iter().filter_map(|v| v.get("reference").and_then(Value::as_str)) {
            if let Some(id) = patient_id(reference).filter(|id| !out.iter().any(|o| o == id)) {
                out.push(id.to_owned());
            }
        }
    }
    out
}

/// The id a reference names if it is a Patient (`Patient/1`, `Patient/1/_history/2`, `…/Patient/1`).
pub fn patient_id(reference: &str) -> Option<&str> {
    let unversioned = reference.split("/_history/").next().unwrap_or_default();
    let (before, id) = unversioned.rsplit_once('/')?;
    let is_patient = before == "Patient" || before.ends_with("/Patient");
    (is_patient && fhirgw_config::pattern::Class::Id.accepts(id)).then_some(id)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn membership() {
        let cases = [
            (json!({"resourceType": "Patient", "id": "p1"}), true),
            (json!({"resourceType": "Patient", "id": "p2"}), false),
            (json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}), true),
            (json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1/_history/3"}}), true),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "https://x.example/fhir/Patient/p1"}}),
                true,
            ),
            (json!({"resourceType": "Observation", "subject": {"reference": "Patient/p10"}}), false),
            (json!({"resourceType": "Observation", "subject": {"reference": "Patient/xp1"}}), false),
            (json!({"resourceType": "Observation", "subject": {"reference": "Group/p1"}}), false),
            (json!({"resourceType": "Observation", "performer": [{"reference": "Patient/p1"}]}), false),
            (json!({"resourceType": "Observation"}), false),
            (json!({"resourceType": "Observation", "subject": "Patient/p1"}), false),
            (json!({"resourceType": "Immunization", "patient": {"reference": "Patient/p1"}}), true),
            (json!({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/p1"}}), true),
            (json!({"resourceType": "Practitioner", "id": "p1"}), false),
            (json!({"resourceType": "Medication", "subject": {"reference": "Patient/p1"}}), false),
            (json!({"id": "p1"}), false),
        ];
        for (resource, want) in cases {
            assert_eq!(contains(&resource, "p1"), want, "{resource}");
        }
    }

    #[test]
    fn patients_read_off_a_resource() {
        let cases = [
            (json!({"resourceType": "Patient", "id": "p1"}), vec!["p1"]),
            (json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1/_history/3"}}), vec!["p1"]),
            (json!({"resourceType": "Observation", "subject": {"reference": "https://x/fhir/Patient/p2"}}), vec!["p2"]),
            (json!({"resourceType": "Observation", "subject": {"reference": "Group/g1"}}), vec![]),
            (json!({"resourceType": "Observation", "performer": [{"reference": "Patient/p1"}]}), vec![]),
            (json!({"resourceType": "Practitioner", "id": "p1"}), vec![]),
            (
                json!({"resourceType": "Account", "subject": [{"reference": "Patient/a"}, {"reference": "Patient/b"}, {"reference": "Patient/a"}]}),
                vec!["a", "b"],
            ),
        ];
        for (resource, want) in cases {
            assert_eq!(patients_of(&resource), want, "{resource}");
        }
        assert_eq!(patient_id("Patient/x y"), None);
        assert_eq!(patient_id("Patient"), None);
    }

    #[test]
    fn search_params() {
        assert_eq!(search_param("Patient", "p1"), Some(("_id".into(), "p1".into())));
        assert_eq!(search_param("Observation", "p1"), Some(("patient".into(), "Patient/p1".into())));
        assert_eq!(search_param("Coverage", "p1"), Some(("patient".into(), "Patient/p1".into())));
        assert_eq!(search_param("Practitioner", "p1"), None);
        assert_eq!(search_param("Medication", "p1"), None);
    }
}
