//! The fhirgw data plane.

pub mod access_log;
pub mod admin_http;
pub mod audit;
pub mod authn;
pub mod body;
pub mod body_budget;
pub mod config_client;
pub mod config_guard;
pub mod cp_tls;
pub mod credentials;
pub mod http_client;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod outcome;
pub mod persist;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod state;
pub mod upstream;
