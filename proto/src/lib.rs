//! Picket's wire protocol: the `picket.v1` gRPC service between agents and aggregators.
//!
//! The schema lives in `picket/v1/ingest.proto`; how it may evolve is in `EVOLUTION.md`.
//! This crate only holds generated code and the aggregator's reading of `AgentMessage`;
//! converting between the wire form and Picket's metric model is `picket_core::codec`.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("picket.v1");
    // The server side of `Ingest`, reading `ReceivedAgentMessage` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/picket.v1.Ingest.rs"));

    /// An `AgentMessage` as the aggregator reads it: the same fields under the same numbers,
    /// but a batch stays the bytes the agent sent. The aggregator checks those bytes and
    /// queues them for its sinks as they are; decoding into [`Batch`] and encoding again
    /// only to queue it cost as much as all the checking.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ReceivedAgentMessage {
        #[prost(oneof = "received_agent_message::Kind", tags = "1, 2")]
        pub kind: ::core::option::Option<received_agent_message::Kind>,
    }

    /// The cases of [`ReceivedAgentMessage`].
    pub mod received_agent_message {
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum Kind {
            /// `AgentMessage.hello`.
            #[prost(message, tag = "1")]
            Hello(super::Hello),
            /// `AgentMessage.batch`: an encoded [`super::Batch`], not yet decoded.
            #[prost(bytes = "bytes", tag = "2")]
            Batch(::bytes::Bytes),
        }
    }
}

/// The protocol revision this build speaks, sent in `Hello.protocol_revision`.
pub const PROTOCOL_REVISION: u32 = 1;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{self, agent_message, received_agent_message};

    fn sample_batch() -> v1::Batch {
        v1::Batch {
            sequence: 7,
            symbols: vec![String::new(), "up".to_owned(), "instance".to_owned()],
            common_labels: vec![2, 1],
            families: vec![v1::Family {
                name: 1,
                r#type: v1::MetricType::Gauge as i32,
                help: 0,
                series: vec![v1::Series {
                    labels: vec![],
                    points: vec![v1::Point {
                        timestamp_ms: 1_700_000_000_000,
                        value: Some(v1::point::Value::Number(1.0)),
                    }],
                }],
            }],
        }
    }

    /// The aggregator's reading must see exactly what an agent's `AgentMessage` carries:
    /// field numbers that drifted apart would silently lose every batch.
    #[test]
    fn the_received_reading_matches_agent_message() {
        let batch = sample_batch();
        let sent = v1::AgentMessage {
            kind: Some(agent_message::Kind::Batch(batch.clone())),
        }
        .encode_to_vec();
        let received = match v1::ReceivedAgentMessage::decode(sent.as_slice()) {
            Ok(m) => m,
            Err(e) => panic!("cannot read an AgentMessage with a batch: {e}"),
        };
        match received.kind {
            Some(received_agent_message::Kind::Batch(bytes)) => {
                assert_eq!(bytes.as_ref(), batch.encode_to_vec().as_slice());
                assert_eq!(v1::Batch::decode(bytes).ok(), Some(batch));
            }
            other => panic!("a batch read as {other:?}"),
        }

        let hello = v1::Hello {
            protocol_revision: 1,
            instance: "pi-7".to_owned(),
            session_id: 42,
            agent_version: "picket-agent test".to_owned(),
            interval_ms: 10_000,
        };
        let sent = v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello.clone())),
        }
        .encode_to_vec();
        let received = v1::ReceivedAgentMessage::decode(sent.as_slice()).ok();
        assert_eq!(
            received.and_then(|m| m.kind),
            Some(received_agent_message::Kind::Hello(hello))
        );

        let empty = v1::AgentMessage { kind: None }.encode_to_vec();
        assert_eq!(
            v1::ReceivedAgentMessage::decode(empty.as_slice())
                .ok()
                .map(|m| m.kind),
            Some(None)
        );
    }
}
