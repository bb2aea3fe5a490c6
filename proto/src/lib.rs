//! The rootlet.v1 API: messages, the tonic client and server, and the file
//! descriptor set that server reflection serves. The `.proto` is in
//! `proto/rootlet/v1/rootlet.proto`.

/// Generated from `rootlet/v1/rootlet.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("rootlet.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rootlet_descriptor.bin"));
