//! Access-control policy: the pure parts (classification, query checks and narrowing, response verification,
//! page tokens, the `$docref` translation, bulk export narrowing and links, NDJSON lines). The proxy applies them;
//! everything here is table-tested.

pub mod batch;
pub mod bundle_filter;
pub mod classify;
pub mod compartment;
pub mod docref;
pub mod export;
pub mod fhirpath_patch;
pub mod input;
pub mod links;
pub mod ndjson;
pub mod paging;
pub mod plan;
pub mod planner;
pub mod query;
pub mod raw;
pub mod references;
pub mod refusal;
pub mod scopes;
pub mod verify;
pub mod write;
