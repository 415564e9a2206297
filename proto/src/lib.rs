//! Generated protocol types. Only the config client, the gRPC services and the `TryFrom` conversions in
//! `fhirgw-config` touch these; everything else works on validated domain types.

#![allow(clippy::all, clippy::pedantic)]

pub mod config {
    pub mod v1 {
        tonic::include_proto!("fhirgw.config.v1");
    }
}

pub mod push {
    pub mod v1 {
        tonic::include_proto!("fhirgw.push.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("fhirgw.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every fhirgw proto and its imports, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fhirgw_descriptor.bin"));

/// `type_url` of a message in `google.protobuf.Any`.
pub fn type_url(full_name: &str) -> String {
    format!("type.googleapis.com/{full_name}")
}
