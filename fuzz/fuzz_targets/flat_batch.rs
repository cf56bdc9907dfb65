//! The aggregator's in-place reading of a batch (`proto/src/flat.rs`): arbitrary bytes read
//! by `FlatBatch::parse` and by prost. Whatever the flat reading accepts, prost must accept
//! and read the same way (every value, NaN bits included); whatever it leaves to prost,
//! `read_received_batch` must read through prost, so both readings accept and refuse the same
//! bytes. And the encoding prost writes (which is what agents write) must never be left to
//! prost, or the fast path would quietly stop being taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_proto::v1::{self, FlatBatch};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let prost = v1::decode_received_batch(data);
    let flat = FlatBatch::parse(data);
    if let Some(flat) = &flat {
        match &prost {
            Ok(batch) => assert_eq!(flat, &FlatBatch::of(batch), "the readings differ"),
            Err(e) => panic!("only prost refused the batch ({e}): {flat:?}"),
        }
    }
    match (v1::read_received_batch(data), &prost) {
        (Ok(read), Ok(batch)) => assert_eq!(read, FlatBatch::of(batch)),
        (Err(read), Err(e)) => assert_eq!(read.to_string(), e.to_string()),
        (read, prost) => panic!("read_received_batch gave {read:?}, prost {prost:?}"),
    }
    if let Ok(batch) = prost {
        // Compared with prost's reading of its encoding rather than with `batch`: proto3
        // leaves out fields at their default, -0.0 among them.
        let canonical = batch.encode_to_vec();
        let again = v1::Batch::decode(canonical.as_slice()).expect("prost reads its own encoding");
        match FlatBatch::parse(&canonical) {
            Some(flat) => assert_eq!(flat, FlatBatch::of(&again)),
            None => panic!("prost's own encoding was left to prost: {batch:?}"),
        }
    }
});
