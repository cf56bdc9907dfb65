//! How the aggregator reads each message of an agent's stream (`proto/src/received.rs`):
//! arbitrary bytes decoded both as the schema's `AgentMessage` and as
//! `ReceivedAgentMessage`, which keeps a batch as bytes so the aggregator can queue it as
//! sent. The two readings must agree: the same hello, and batch bytes that decode to
//! exactly the batch `AgentMessage` sees (or fail to decode where `AgentMessage` fails),
//! also when a batch comes in several parts or a later field replaces it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_proto::v1::{self, agent_message, received_agent_message};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let schema = v1::AgentMessage::decode(data);
    let Ok(received) = v1::ReceivedAgentMessage::decode(data) else {
        // Batch bytes are not checked by this reading, so it fails only where the message
        // itself is broken, and then the schema's reading fails too.
        assert!(
            schema.is_err(),
            "only the aggregator's reading failed: {schema:?}"
        );
        return;
    };
    match (received.kind, schema) {
        (None, Ok(message)) => assert_eq!(message.kind, None),
        (Some(received_agent_message::Kind::Hello(hello)), Ok(message)) => {
            assert_eq!(message.kind, Some(agent_message::Kind::Hello(hello)));
        }
        (Some(received_agent_message::Kind::Batch(bytes)), schema) => {
            // Compared by their encoding, which is exact for every value: a NaN (a sum,
            // say) equals nothing, itself included.
            let batch = v1::decode_received_batch(&bytes.into_bytes())
                .ok()
                .map(|b| b.encode_to_vec());
            let expected = schema.ok().and_then(|m| match m.kind {
                Some(agent_message::Kind::Batch(b)) => Some(b.encode_to_vec()),
                _ => None,
            });
            assert_eq!(batch, expected, "the batch reads differently");
        }
        (kind, Err(e)) => panic!("only the schema's reading failed ({e}) on {kind:?}"),
    }
});
