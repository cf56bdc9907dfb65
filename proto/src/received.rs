//! `AgentMessage` as the aggregator reads it: the same fields under the same numbers, but a
//! batch stays the bytes the agent sent. The aggregator checks those bytes and queues them
//! for its sinks as they are; decoding into [`Batch`] and encoding it again only to queue it
//! cost as much as all the checking.
//!
//! `Message` is written by hand rather than derived: when a message field appears twice in
//! one message, protobuf decodes each occurrence and merges them, while a derived bytes
//! field would keep only the last. Agents never split a batch, but the aggregator reads any
//! valid encoding as `AgentMessage` would; the `agent_message` fuzz target holds it to that.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::flat::FlatBatch;
use crate::v1::{Batch, Hello};

/// `AgentMessage.hello`'s field number.
const HELLO_TAG: u32 = 1;
/// `AgentMessage.batch`'s field number.
const BATCH_TAG: u32 = 2;

/// An `AgentMessage` with its batch left encoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceivedAgentMessage {
    pub kind: Option<received_agent_message::Kind>,
}

/// The cases of [`ReceivedAgentMessage`].
pub mod received_agent_message {
    /// What a [`super::ReceivedAgentMessage`] carries.
    #[derive(Clone, Debug, PartialEq)]
    pub enum Kind {
        /// `AgentMessage.hello`.
        Hello(super::Hello),
        /// `AgentMessage.batch`, not yet decoded.
        Batch(super::ReceivedBatch),
    }
}

/// The bytes of one `AgentMessage.batch`. Almost always one part. A batch sent as several
/// fields is kept as its parts, each checked to be a `Batch` by itself (as merging requires),
/// and joined once, so a message of many small parts costs linear time.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedBatch {
    parts: Vec<Bytes>,
}

impl ReceivedBatch {
    /// The batch's encoding: its parts one after the other, which decodes as their merge.
    pub fn into_bytes(self) -> Bytes {
        match <[Bytes; 1]>::try_from(self.parts) {
            Ok([only]) => only,
            Err(parts) => {
                let mut joined = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                for part in &parts {
                    joined.extend_from_slice(part);
                }
                joined.freeze()
            }
        }
    }
}

/// Decodes a batch's bytes as `AgentMessage` decodes its `batch` field: as a nested
/// message, which spends one level of prost's recursion budget (a batch nesting unknown
/// groups one level too deep is refused by both). `ctx` is the context of the message
/// holding the batch.
fn decode_nested(bytes: &[u8], ctx: DecodeContext) -> Result<Batch, DecodeError> {
    // The length prefix a nested field has, written on the stack: this runs for every batch.
    let length = bytes.len() as u64;
    let mut prefix = [0u8; 10];
    prost::encoding::encode_varint(length, &mut &mut prefix[..]);
    let used = prost::encoding::encoded_len_varint(length);
    let mut nested = prefix[..used].chain(bytes);
    let mut batch = Batch::default();
    prost::encoding::message::merge(WireType::LengthDelimited, &mut batch, &mut nested, ctx)?;
    Ok(batch)
}

/// Decodes the bytes of [`ReceivedBatch::into_bytes`] exactly as `AgentMessage` would
/// have decoded the batch.
pub fn decode_received_batch(bytes: &[u8]) -> Result<Batch, DecodeError> {
    decode_nested(bytes, DecodeContext::default())
}

/// Reads the bytes of [`ReceivedBatch::into_bytes`] as [`decode_received_batch`] does,
/// in place where the encoding is the usual one ([`FlatBatch::parse`]) and through prost
/// otherwise, so the same bytes are accepted, read the same way and refused with the same
/// error.
pub fn read_received_batch(bytes: &[u8]) -> Result<FlatBatch<'_>, DecodeError> {
    match FlatBatch::parse(bytes) {
        Some(batch) => Ok(batch),
        None => decode_received_batch(bytes).map(FlatBatch::from_batch),
    }
}

impl From<Bytes> for ReceivedBatch {
    fn from(bytes: Bytes) -> Self {
        ReceivedBatch { parts: vec![bytes] }
    }
}

impl Message for ReceivedAgentMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        use received_agent_message::Kind;
        match &self.kind {
            Some(Kind::Hello(hello)) => prost::encoding::message::encode(HELLO_TAG, hello, buf),
            Some(Kind::Batch(batch)) => {
                for part in &batch.parts {
                    prost::encoding::bytes::encode(BATCH_TAG, part, buf);
                }
            }
            None => {}
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        use received_agent_message::Kind;
        match tag {
            // A oneof member that is a message merges into the same member and replaces
            // any other.
            HELLO_TAG => match &mut self.kind {
                Some(Kind::Hello(hello)) => {
                    prost::encoding::message::merge(wire_type, hello, buf, ctx)
                }
                other => {
                    // `AgentMessage`'s reading has decoded the batch this replaces, and
                    // failed if it was broken; so does this one (several parts were checked
                    // as they came).
                    if let Some(Kind::Batch(batch)) = other
                        && let [only] = batch.parts.as_slice()
                    {
                        decode_nested(only, ctx.clone())?;
                    }
                    let mut hello = Hello::default();
                    prost::encoding::message::merge(wire_type, &mut hello, buf, ctx)?;
                    self.kind = Some(Kind::Hello(hello));
                    Ok(())
                }
            },
            BATCH_TAG => {
                let mut part = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut part, buf, ctx.clone())?;
                match &mut self.kind {
                    // A lone part is checked when the aggregator decodes it; once there are
                    // two, each must be a whole `Batch` by itself, as `AgentMessage`'s
                    // reading decodes them one by one.
                    Some(Kind::Batch(batch)) => {
                        if let [first] = batch.parts.as_slice() {
                            decode_nested(first, ctx.clone())?;
                        }
                        decode_nested(&part, ctx)?;
                        batch.parts.push(part);
                    }
                    _ => self.kind = Some(Kind::Batch(ReceivedBatch::from(part))),
                }
                Ok(())
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use received_agent_message::Kind;
        match &self.kind {
            Some(Kind::Hello(hello)) => prost::encoding::message::encoded_len(HELLO_TAG, hello),
            Some(Kind::Batch(batch)) => batch
                .parts
                .iter()
                .map(|part| prost::encoding::bytes::encoded_len(BATCH_TAG, part))
                .sum(),
            None => 0,
        }
    }

    fn clear(&mut self) {
        self.kind = None;
    }
}
