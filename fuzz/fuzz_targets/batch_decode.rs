//! The batches agents send (`lib/picket-core/src/codec.rs`): arbitrary bytes through prost's
//! decoding of `picket.v1.Batch`, then `decode_batch`, which validates everything a peer could
//! get wrong. A batch it accepts must be valid for the sinks, and encoding what it decoded
//! with `BatchEncoder` must give a batch that decodes to the same samples. `validate_batch`
//! (the aggregator's relay path, which skips the decode) must agree with it on every input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_core::codec::{BatchEncoder, decode_batch, validate_batch};
use picket_core::model::Labels;
use picket_fuzz::check_model_families;
use picket_proto::v1;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = v1::Batch::decode(data) else {
        return;
    };
    let full = decode_batch(&batch);
    // Compared as messages: an error can carry a NaN (a bad quantile), which equals nothing.
    assert_eq!(
        validate_batch(&batch).map_err(|e| e.to_string()),
        full.as_ref()
            .map(|d| d.sample_count())
            .map_err(|e| e.to_string()),
        "validation alone disagrees with the full decode"
    );
    let decoded = match full {
        Ok(decoded) => decoded,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    check_model_families(&decoded.families);

    // Re-encode (common labels are already merged into every point) and decode again. A
    // series without points has nothing to carry over, and the encoder leaves such families
    // out only if they have no points at all.
    let mut encoder = BatchEncoder::new(&Labels::new());
    for family in decoded.families.iter().filter(|f| !f.points.is_empty()) {
        encoder.push(family);
    }
    let again = encoder.finish(decoded.sequence);
    let bytes = again.encode_to_vec();
    let Ok(wire) = v1::Batch::decode(bytes.as_slice()) else {
        panic!("a batch the encoder made does not decode as protobuf");
    };
    match decode_batch(&wire) {
        Ok(redecoded) => {
            assert_eq!(redecoded.sample_count(), decoded.sample_count());
            assert_eq!(redecoded.sequence, decoded.sequence);
        }
        Err(e) => panic!("a batch the encoder made is refused: {e}"),
    }
});
