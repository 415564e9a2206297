//! A config stream opened as a data plane would, over a real socket, for tests that need a data plane under their
//! control (one that never ACKs, or whose stream closes at a chosen moment).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fhirgw_proto::push::v1 as push;
use fhirgw_proto::push::v1::config_discovery_client::ConfigDiscoveryClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{DATAPLANE_TOKEN, Process, TokenAuth, grpc_url};

pub struct Stream {
    /// Dropping it closes the data plane's side of the stream (the control plane sees the stream end).
    pub tx: mpsc::Sender<push::ConfigRequest>,
    pub inbound: tonic::Streaming<push::ConfigResponse>,
}

impl Stream {
    /// ACKs `response`.
    pub async fn ack(&self, response: &push::ConfigResponse) {
        self.tx
            .send(push::ConfigRequest { response_nonce: response.nonce.clone(), ..Default::default() })
            .await
            .unwrap();
    }
}

/// Opens a stream to `cp` as node `node`, holding store `store_id` at revision `held`; returns it with the first
/// response (not yet ACKed).
pub async fn open(cp: &Process, node: &str, store_id: &str, held: u64) -> (Stream, push::ConfigResponse) {
    let channel = tonic::transport::Channel::from_shared(grpc_url(cp)).unwrap().connect().await.unwrap();
    let mut client = ConfigDiscoveryClient::with_interceptor(channel, TokenAuth::bearer(DATAPLANE_TOKEN));
    let (tx, rx) = mpsc::channel(4);
    tx.send(push::ConfigRequest {
        node: Some(push::Node { id: node.into(), ..Default::default() }),
        store_id: store_id.into(),
        held_system_version: held,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client.stream_config(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    (Stream { tx, inbound }, first)
}
