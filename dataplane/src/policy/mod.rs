//! Access-control policy: the pure parts (classification, query checks and narrowing, response verification,
//! page tokens). The proxy applies them; everything here is table-tested.

pub mod batch;
pub mod classify;
pub mod compartment;
pub mod paging;
pub mod query;
pub mod raw;
pub mod stream;
pub mod verify;
pub mod write;
