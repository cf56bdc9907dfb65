//! The aggregator's in-place reading of a batch (`proto/src/flat.rs`): arbitrary bytes read
//! by `FlatBatch::parse` and by prost. Whatever the flat reading accepts, prost must accept
//! and read the same way (every value, NaN bits included); whatever it leaves to prost,
//! `read_received_batch` must read through prost, so both readings accept and refuse the same
//! bytes. And the encoding prost writes (which is what agents write) must never be left to
//! prost, or the fast path would quietly stop being taken.
//!
//! The skeleton reading (`FlatBatch::parse_skeleton`) must read every batch the flat reading
//! reads, with the same points; the next round of a batch (only its readings changed) must
//! have its skeleton; and two halves of the input with equal skeletons, both read in full,
//! must have the same symbols and labels (what a skeleton stands for; random halves rarely
//! get that far, `proto/src/flat.rs`'s tests cover it on purpose).
//!
//! A template (`BatchTemplate`) learnt from one batch may read another only if the two have
//! the same skeleton, and must then give the skeleton reading's points: checked on the
//! input read through itself (which it must read), on the two halves of the input, and on
//! the next round of prost's encoding of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picket_proto::v1::{self, BatchTemplate, FlatBatch};
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
    let mut skeleton = Vec::new();
    let points = FlatBatch::parse_skeleton(data, &mut skeleton);
    if let Some(flat) = &flat {
        assert_eq!(
            points.as_ref(),
            Some(&flat.clone().without_labels()),
            "the skeleton reading differs"
        );
    }
    let mut template = BatchTemplate::default();
    assert_eq!(
        template.learn(data),
        points.is_some(),
        "learnt unlike the skeleton"
    );
    if let Some(points) = &points {
        assert_eq!(template.read(data), Some(points), "read through itself");
    }
    let (left, right) = data.split_at(data.len() / 2);
    if template.learn(left)
        && let Some(reading) = template.read(right)
    {
        let mut of_left = Vec::new();
        FlatBatch::parse_skeleton(left, &mut of_left).expect("learnt, so readable");
        let of_right = FlatBatch::parse_skeleton(right, &mut skeleton)
            .expect("read through a template, so readable");
        assert_eq!(
            skeleton, of_left,
            "read through another skeleton's template"
        );
        assert_eq!(reading, &of_right);
    }
    let mut other = Vec::new();
    if let (Some(a), Some(b), Some(_), Some(_)) = (
        FlatBatch::parse(left),
        FlatBatch::parse(right),
        FlatBatch::parse_skeleton(left, &mut skeleton),
        FlatBatch::parse_skeleton(right, &mut other),
    ) && skeleton == other
    {
        assert_eq!(a.symbols(), b.symbols());
        assert_eq!(a.common_labels(), b.common_labels());
        for (fa, fb) in a.families().iter().zip(b.families()) {
            assert_eq!((fa.name, fa.r#type, fa.help), (fb.name, fb.r#type, fb.help));
            for (sa, sb) in a.series(fa).iter().zip(b.series(fb)) {
                assert_eq!(a.labels(sa), b.labels(sb));
            }
        }
        assert_eq!(a.without_labels().families(), b.without_labels().families());
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
        // The next round of the same batch (every timestamp, value, count and the sequence
        // changed, nothing else) has the same skeleton.
        let mut next = again.clone();
        next_round(&mut next);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        FlatBatch::parse_skeleton(&canonical, &mut first).expect("prost's encoding, as a skeleton");
        let next = next.encode_to_vec();
        FlatBatch::parse_skeleton(&next, &mut second).expect("the next round, as a skeleton");
        assert_eq!(
            first, second,
            "a round with other readings has another skeleton"
        );
        // Through a template, when it reads it at all: the same length is not enough (a
        // count that drops to 0 leaves its field out while the sequence, 0 before, comes in),
        // so only what it reads is checked.
        assert!(template.learn(&canonical), "prost's encoding, learnt");
        let points = FlatBatch::parse_skeleton(&next, &mut second).expect("read above");
        if let Some(reading) = template.read(&next) {
            assert_eq!(reading, &points, "the next round, through a template");
        }
    }
});

/// Changes every reading of `batch` (sequence, timestamps, values, counts and sums) and
/// nothing else.
fn next_round(batch: &mut v1::Batch) {
    use v1::point::Value;
    batch.sequence = batch.sequence.wrapping_add(1);
    for family in &mut batch.families {
        for series in &mut family.series {
            for point in &mut series.points {
                point.timestamp_ms = point.timestamp_ms.wrapping_add(1);
                match &mut point.value {
                    Some(Value::Number(v)) => *v += 1.0,
                    Some(Value::Summary(s)) => {
                        s.count = s.count.wrapping_add(1);
                        s.sum += 1.0;
                        for q in &mut s.quantiles {
                            q.value += 1.0;
                        }
                    }
                    Some(Value::Histogram(h)) => {
                        h.count ^= 1;
                        h.sum += 1.0;
                        for b in &mut h.buckets {
                            b.cumulative_count ^= 1;
                        }
                    }
                    Some(Value::Stale(_)) | None => {}
                }
            }
        }
    }
}
