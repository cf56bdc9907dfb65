//! Picket's wire protocol: the `picket.v1` gRPC service between agents and aggregators.
//!
//! The schema lives in `picket/v1/ingest.proto`; how it may evolve is in `EVOLUTION.md`.
//! This crate only holds generated code and the aggregator's readings of `AgentMessage`
//! and of the batches in it (`received.rs`, `flat.rs`);
//! converting between the wire form and Picket's metric model is `picket_core::codec`.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("picket.v1");
    // The server side of `Ingest`, reading `ReceivedAgentMessage` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/picket.v1.Ingest.rs"));

    pub use crate::flat::{
        BatchTemplate, FlatBatch, FlatFamily, FlatPoint, FlatSeries, FlatValue, Span,
    };
    pub use crate::received::{
        ReceivedAgentMessage, ReceivedBatch, decode_received_batch, read_received_batch,
        received_agent_message,
    };
}

mod flat;
mod received;

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
                let bytes = bytes.into_bytes();
                assert_eq!(bytes.as_ref(), batch.encode_to_vec().as_slice());
                assert_eq!(v1::Batch::decode(bytes).ok(), Some(batch.clone()));
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
            Some(received_agent_message::Kind::Hello(hello.clone()))
        );

        // One message carrying the batch field twice (a batch split in two at a field
        // boundary, then a hello and a batch again): read as `AgentMessage` reads it.
        let mut head = batch.clone();
        let tail_families = std::mem::take(&mut head.families);
        let tail = v1::Batch {
            families: tail_families,
            ..Default::default()
        };
        let mut split = Vec::new();
        for part in [head, tail] {
            split.extend(
                v1::AgentMessage {
                    kind: Some(agent_message::Kind::Batch(part)),
                }
                .encode_to_vec(),
            );
        }
        let as_agent_message = v1::AgentMessage::decode(split.as_slice()).ok();
        assert_eq!(
            as_agent_message.and_then(|m| m.kind),
            Some(agent_message::Kind::Batch(batch.clone()))
        );
        let received = v1::ReceivedAgentMessage::decode(split.as_slice()).ok();
        match received.and_then(|m| m.kind) {
            Some(received_agent_message::Kind::Batch(bytes)) => {
                assert_eq!(
                    v1::Batch::decode(bytes.into_bytes()).ok(),
                    Some(batch.clone())
                );
            }
            other => panic!("a split batch read as {other:?}"),
        }
        // Split inside a field: neither part is a batch, so neither reading accepts it.
        let whole = batch.encode_to_vec();
        let (left, right) = whole.split_at(whole.len() / 2);
        let mut torn = Vec::new();
        for part in [left, right] {
            torn.push(0x12); // AgentMessage.batch (2), length-delimited
            torn.push(u8::try_from(part.len()).unwrap());
            torn.extend_from_slice(part);
        }
        assert!(v1::AgentMessage::decode(torn.as_slice()).is_err());
        assert!(v1::ReceivedAgentMessage::decode(torn.as_slice()).is_err());
        let mut hello_then_batch = v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello.clone())),
        }
        .encode_to_vec();
        hello_then_batch.extend(
            v1::AgentMessage {
                kind: Some(agent_message::Kind::Batch(batch.clone())),
            }
            .encode_to_vec(),
        );
        let received = v1::ReceivedAgentMessage::decode(hello_then_batch.as_slice()).ok();
        assert_eq!(
            received.and_then(|m| m.kind),
            Some(received_agent_message::Kind::Batch(
                bytes::Bytes::from(batch.encode_to_vec()).into()
            ))
        );
        // And what the aggregator's reading encodes, an AgentMessage reads back.
        let round = v1::ReceivedAgentMessage {
            kind: Some(received_agent_message::Kind::Batch(
                bytes::Bytes::from(batch.encode_to_vec()).into(),
            )),
        }
        .encode_to_vec();
        assert_eq!(
            v1::AgentMessage::decode(round.as_slice())
                .ok()
                .and_then(|m| m.kind),
            Some(agent_message::Kind::Batch(batch))
        );

        // A broken batch that a hello then replaces: the schema's reading has decoded it
        // and failed, so the aggregator's must fail too.
        let replaced = [0x12, 0x01, 0x07, 0x0a, 0x00];
        assert!(v1::AgentMessage::decode(replaced.as_slice()).is_err());
        assert!(v1::ReceivedAgentMessage::decode(replaced.as_slice()).is_err());

        let empty = v1::AgentMessage { kind: None }.encode_to_vec();
        assert_eq!(
            v1::ReceivedAgentMessage::decode(empty.as_slice())
                .ok()
                .map(|m| m.kind),
            Some(None)
        );
    }

    /// prost limits how deeply it decodes (unknown groups included); a batch is one level
    /// down in its message, and the aggregator's reading must spend that level too.
    #[test]
    fn the_received_reading_has_the_same_nesting_limit() {
        let message = |groups: usize| {
            let mut batch = vec![0x08, 0x01]; // sequence 1
            batch.extend(std::iter::repeat_n(0x7b, groups)); // field 15, start group
            batch.extend(std::iter::repeat_n(0x7c, groups)); // field 15, end group
            let mut message = vec![0x12];
            prost::encoding::encode_varint(batch.len() as u64, &mut message);
            message.extend(batch);
            message
        };
        let mut outcomes = Vec::new();
        for groups in 95..=101 {
            let bytes = message(groups);
            let schema = v1::AgentMessage::decode(bytes.as_slice()).is_ok();
            let received = match v1::ReceivedAgentMessage::decode(bytes.as_slice()) {
                Ok(v1::ReceivedAgentMessage {
                    kind: Some(received_agent_message::Kind::Batch(batch)),
                }) => v1::decode_received_batch(&batch.into_bytes()).is_ok(),
                Ok(other) => panic!("{groups} groups read as {other:?}"),
                Err(_) => false,
            };
            assert_eq!(received, schema, "{groups} nested groups");
            outcomes.push(schema);
        }
        // The range straddles the limit.
        assert!(
            outcomes.contains(&true) && outcomes.contains(&false),
            "{outcomes:?}"
        );
    }
}
