//! The fhirgw control plane: stores configuration durably and pushes it to data planes.

pub mod admin;
pub mod admin_http;
pub mod auth;
pub mod limits;
pub mod metrics;
pub mod objects;
pub mod operators;
pub mod peer_auth;
pub mod push;
pub mod status;
pub mod store;
pub mod transport;
