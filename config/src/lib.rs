//! The validated configuration model shared by the control plane and the data plane.
//!
//! Generated protobuf types come in through one door, [`Snapshot::build`] (and the per-kind `TryFrom` conversions it
//! runs); everything downstream works on the domain types here. The control plane runs the very same function on
//! every write, so a configuration it accepts cannot be rejected by a data plane of the same version.
//!
//! Pure: no I/O, no clocks except where a caller passes the time in.

pub mod audit;
pub mod identity;
pub mod names;
pub mod path;
pub mod pattern;
pub mod resource;
pub mod route;
pub mod snapshot;
pub mod tenant;
pub mod upstream;

pub use resource::{Kind, RawResource, Rejection, ResourceKey, ResourceSet};
pub use snapshot::Snapshot;
