//! InfluxDB line protocol for the `influxdb` sink: turns Picket's metric families into the body
//! of a v1 (`/write`) or v2 (`/api/v2/write`) request, one point per line, timestamps in
//! milliseconds (`precision=ms`).
//!
//! # Mapping
//!
//! Two layouts, chosen per sink:
//!
//! * **`family`** (default): one measurement per metric family.
//!   - gauge, counter, untyped: `name,tags value=V ts`
//!   - summary: `name,tags count=C,sum=S ts`, plus one line per quantile
//!     `name,tags,quantile=Q value=V ts`
//!   - histogram: `name,tags count=C,sum=S ts`, plus one line per bucket
//!     `name,tags,le=B bucket=N ts` (cumulative count); a `le=+Inf` bucket equal to the count is
//!     added when the last bound is not `+Inf`, as Prometheus would expose it.
//! * **`grouped`**, like Telegraf's Prometheus input with `metric_version = 2`: a single
//!   measurement (`prometheus` unless configured) and one field per metric: `name` for numbers;
//!   `name_count` and `name_sum` on the point's own tags for summaries and histograms; quantile
//!   lines tagged `quantile` with field `name`; bucket lines tagged `le` with field
//!   `name_bucket`. Points with exactly the same tag set and timestamp, from any family in the
//!   batch, are merged into one line with several fields, sorted by key; when two values have
//!   the same field key on the same line, the last one in the input is written.
//!
//! `quantile` and `le` values are written as in the Prometheus exposition (`0.5`, `1`, `+Inf`)
//! and replace a label of the same name.
//!
//! # Values
//!
//! Every value is written as a float, including summary and histogram counts: InfluxDB fixes a
//! field's type on first write and refuses a later point of another type (`field type
//! conflict`, which fails the whole request), so a field must never switch between integer and
//! float. A number without the `i` suffix is a float in line protocol, so integral values are
//! written without a fraction (`1`, not `1.0`) and counts as their exact decimal digits. Other
//! values use the shortest text that reads back as the same `f64`, with an exponent outside
//! `[1e-4, 1e16)` (`1e300`, not 301 digits).
//!
//! NaN and ±Inf cannot be written (InfluxDB refuses the line): such a value is left out and
//! counted in [`LineStats::dropped_non_finite`]. In `grouped` mode only that field is left out;
//! the line is written if other fields remain. Stale markers mean nothing to InfluxDB (it has no
//! staleness); they are skipped and counted in [`LineStats::skipped_stale`].
//!
//! # Tags and names
//!
//! Tags are the point's labels, sorted by key. Left out: labels with an empty value or key
//! (InfluxDB refuses empty tag values; an absent tag is how it represents "no value"), and the
//! keys `time`, `_field` and `_measurement`, which InfluxDB reserves and for which it discards
//! the whole point (1.x for `time`, 2.x for all three).
//!
//! In `grouped` mode a metric named `time`, `_field` or `_measurement` would become a reserved
//! field key; that field is not written (and not counted).
//!
//! # Escaping
//!
//! As the line protocol reference says: commas and spaces are escaped with a backslash in
//! measurements; commas, equals signs and spaces in tag keys, tag values and field keys. Quotes
//! and non-ASCII UTF-8 pass through as they are. A newline or carriage return would end the
//! line, and line protocol has no escape for them, so they are written as the two characters
//! `\n` and `\r` (InfluxDB stores a backslash and a letter).
//!
//! Backslashes are the one thing line protocol cannot always carry. Checked against InfluxDB
//! 1.6.7 (the trailing-backslash limit is also reported for 1.8 and Telegraf users):
//!
//! * A separator preceded by a backslash is always taken as escaped, however many backslashes
//!   precede it, so a name cannot end in a backslash: `k=v\` and `k=v\\` before a space or
//!   comma are both refused (`invalid tag format`), and doubling is no escape.
//! * Tag keys and values: a backslash followed by anything keeps its meaning, and a backslash
//!   before an escaped character is written as is, so `a\,b` becomes `a\\,b` and reads back
//!   exactly. A value ending in backslashes gets an escaped space after them (`C:\` is stored
//!   as `C:\ `): the only way to keep the backslash, and unlike dropping it, it does not merge
//!   the series with the one whose value is `C:`.
//! * Measurements and field keys: the server also unescapes `\=` and `\"` there, and a
//!   backslash directly before an escaped comma or space leaves the measurement unqueryable
//!   (stored under one name, indexed under another) or the field unparsable. So backslashes
//!   directly before `,`, ` `, `=`, `"` or at the end of the name are dropped. Elsewhere they are
//!   kept (`a\b` reads back as `a\b`).
//! * A measurement starting with `#` would make the line a comment that InfluxDB silently
//!   ignores; it is written as `\#`, which InfluxDB stores with the backslash.
//!
//! Family names and label names are checked by the wire codec (Prometheus syntax), so in
//! practice only tag values and the configured `grouped` measurement ever need escaping.
//!
//! Timestamps are written as given; InfluxDB refuses a point outside its range (about the years
//! 1677 to 2262).

use std::collections::HashMap;
use std::io::Write;

use picket_core::exposition::format_float;
use picket_core::model::{Family, Labels, Value};

/// How Picket's families map onto InfluxDB measurements and fields (see the module doc).
/// The sink's config (`mapping`, `measurement`) chooses one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mapping {
    /// One measurement per metric family, field `value`.
    #[default]
    Family,
    /// Telegraf `metric_version = 2` style: one measurement, each metric a field, points
    /// with the same tags and timestamp merged into one line.
    Grouped { measurement: String },
}

/// Why `measurement` is a poor `grouped` measurement name, for config validation. The encoder
/// writes any name safely, but these ones would not read back as configured.
pub fn measurement_problem(measurement: &str) -> Option<&'static str> {
    if measurement.is_empty() {
        Some("the measurement must not be empty")
    } else if measurement.starts_with('#') {
        Some("a measurement starting with '#' would make each line a comment")
    } else if measurement.chars().any(char::is_control) {
        Some("the measurement must not contain control characters")
    } else if measurement.contains('\\') {
        Some("InfluxDB mangles backslashes in measurement names")
    } else {
        None
    }
}

/// What one [`encode`] call wrote and left out.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineStats {
    /// Lines written.
    pub lines: usize,
    /// Field values written (a merged `grouped` line counts each of its fields).
    pub samples: usize,
    /// NaN or ±Inf values left out.
    pub dropped_non_finite: usize,
    /// Stale markers skipped (one per stale point).
    pub skipped_stale: usize,
}

/// Appends line protocol for `families` to `out` (ms precision timestamps, one '\n' after each
/// line).
pub fn encode<'a>(
    families: impl IntoIterator<Item = &'a Family>,
    mapping: &Mapping,
    out: &mut Vec<u8>,
) -> LineStats {
    match mapping {
        Mapping::Family => encode_by_family(families, out),
        Mapping::Grouped { measurement } => encode_grouped(families, measurement, out),
    }
}

/// What a field holds, named per mapping: `value`/`count`/`sum`/`bucket` in `family` mode,
/// `name`/`name_count`/`name_sum`/`name_bucket` in `grouped` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Value,
    Count,
    Sum,
    Bucket,
}

impl Role {
    fn family_key(self) -> &'static [u8] {
        match self {
            Role::Value => b"value",
            Role::Count => b"count",
            Role::Sum => b"sum",
            Role::Bucket => b"bucket",
        }
    }

    fn grouped_suffix(self) -> &'static str {
        match self {
            Role::Value => "",
            Role::Count => "_count",
            Role::Sum => "_sum",
            Role::Bucket => "_bucket",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A field value. Counts stay integers until written so that counts above 2^53 keep their
/// exact digits (InfluxDB parses them as floats either way).
#[derive(Clone, Copy, Debug, PartialEq)]
enum FieldValue {
    Float(f64),
    Count(u64),
}

/// The extra tag of a quantile or bucket line.
type ExtraTag<'s> = Option<(&'static str, &'s str)>;

/// Walks the points of one family, leaving out stale and non-finite values (counted in
/// `stats`), and hands each line's labels, extra tag, timestamp and (non-empty) fields to
/// `emit`. Both mappings share this so they agree on what is written.
fn walk_family(
    family: &Family,
    bounds: &mut BoundCache,
    stats: &mut LineStats,
    mut emit: impl FnMut(&Labels, ExtraTag<'_>, i64, &[(Role, FieldValue)]),
) {
    for point in &family.points {
        let labels = &point.labels;
        let ts = point.timestamp_ms;
        match &point.value {
            Value::Stale => stats.skipped_stale += 1,
            Value::Number(v) => {
                if v.is_finite() {
                    emit(labels, None, ts, &[(Role::Value, FieldValue::Float(*v))]);
                } else {
                    stats.dropped_non_finite += 1;
                }
            }
            Value::Summary(s) => {
                emit_count_sum(labels, ts, s.count, s.sum, stats, &mut emit);
                for (i, &(q, v)) in s.quantiles.iter().enumerate() {
                    if !v.is_finite() {
                        stats.dropped_non_finite += 1;
                        continue;
                    }
                    let q = bounds.text(i, q);
                    emit(
                        labels,
                        Some(("quantile", q)),
                        ts,
                        &[(Role::Value, FieldValue::Float(v))],
                    );
                }
            }
            Value::Histogram(h) => {
                emit_count_sum(labels, ts, h.count, h.sum, stats, &mut emit);
                for (i, &(le, n)) in h.buckets.iter().enumerate() {
                    let le = bounds.text(i, le);
                    emit(
                        labels,
                        Some(("le", le)),
                        ts,
                        &[(Role::Bucket, FieldValue::Count(n))],
                    );
                }
                // Queries written for Prometheus expect the +Inf bucket; it always equals the
                // count, so it can be added when the source left it out.
                if h.buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
                    emit(
                        labels,
                        Some(("le", "+Inf")),
                        ts,
                        &[(Role::Bucket, FieldValue::Count(h.count))],
                    );
                }
            }
        }
    }
}

fn emit_count_sum(
    labels: &Labels,
    ts: i64,
    count: u64,
    sum: f64,
    stats: &mut LineStats,
    emit: &mut impl FnMut(&Labels, ExtraTag<'_>, i64, &[(Role, FieldValue)]),
) {
    if sum.is_finite() {
        let fields = [
            (Role::Count, FieldValue::Count(count)),
            (Role::Sum, FieldValue::Float(sum)),
        ];
        emit(labels, None, ts, &fields);
    } else {
        stats.dropped_non_finite += 1;
        emit(labels, None, ts, &[(Role::Count, FieldValue::Count(count))]);
    }
}

/// The `quantile`/`le` text of each position, kept between points: a family's points almost
/// always share their bounds, so each is formatted once rather than once per point.
#[derive(Default)]
struct BoundCache {
    entries: Vec<(u64, String)>,
}

impl BoundCache {
    fn text(&mut self, position: usize, bound: f64) -> &str {
        let bits = bound.to_bits();
        if position >= self.entries.len() {
            self.entries
                .resize_with(position + 1, || (bits, format_float(bound)));
        }
        let entry = &mut self.entries[position];
        if entry.0 != bits {
            *entry = (bits, format_float(bound));
        }
        &entry.1
    }
}

fn encode_by_family<'a>(
    families: impl IntoIterator<Item = &'a Family>,
    out: &mut Vec<u8>,
) -> LineStats {
    let mut stats = LineStats::default();
    let mut bounds = BoundCache::default();
    let mut measurement = Vec::new();
    for family in families {
        measurement.clear();
        write_escaped(&mut measurement, &family.name, Part::Measurement);
        if measurement.is_empty() {
            // Only possible for a name the wire codec would have refused; InfluxDB would refuse
            // every line ("missing measurement").
            continue;
        }
        let mut lines = 0;
        let mut samples = 0;
        walk_family(
            family,
            &mut bounds,
            &mut stats,
            |labels, extra, ts, fields| {
                out.extend_from_slice(&measurement);
                write_tag_set(out, labels, extra);
                let mut separator = b' ';
                for &(role, value) in fields {
                    out.push(separator);
                    separator = b',';
                    out.extend_from_slice(role.family_key());
                    out.push(b'=');
                    write_value(out, value);
                }
                write_timestamp(out, ts);
                lines += 1;
                samples += fields.len();
            },
        );
        stats.lines += lines;
        stats.samples += samples;
    }
    stats
}

/// One `grouped` line being assembled: its timestamp and fields in input order.
struct Group {
    timestamp_ms: i64,
    fields: Vec<(u32, FieldValue)>,
}

/// The escaped field keys of one family in `grouped` mode, built on first use: `None` until
/// then, `Some(None)` when the key cannot be written (empty or reserved).
#[derive(Default)]
struct FamilyKeys([Option<Option<u32>>; 4]);

impl FamilyKeys {
    fn get(&mut self, role: Role, name: &str, keys: &mut Vec<Vec<u8>>) -> Option<u32> {
        *self.0[role.index()].get_or_insert_with(|| {
            // Escape the whole key at once: a backslash at the end of `name` is not at the end
            // of `name_count`.
            let mut raw = String::with_capacity(name.len() + 7);
            raw.push_str(name);
            raw.push_str(role.grouped_suffix());
            if RESERVED_KEYS.contains(&raw.as_str()) {
                return None;
            }
            let mut escaped = Vec::with_capacity(raw.len());
            write_escaped(&mut escaped, &raw, Part::FieldKey);
            if escaped.is_empty() {
                return None;
            }
            let id = u32::try_from(keys.len()).ok()?;
            keys.push(escaped);
            Some(id)
        })
    }
}

fn encode_grouped<'a>(
    families: impl IntoIterator<Item = &'a Family>,
    measurement: &str,
    out: &mut Vec<u8>,
) -> LineStats {
    let mut stats = LineStats::default();
    let mut escaped_measurement = Vec::with_capacity(measurement.len());
    write_escaped(&mut escaped_measurement, measurement, Part::Measurement);

    let mut bounds = BoundCache::default();
    // Escaped field keys by id; a family's keys are built once, not per point.
    let mut keys: Vec<Vec<u8>> = Vec::new();
    // Escaped tag set (",k=v,...") followed by the timestamp's bytes, to the group's index.
    let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut scratch = Vec::with_capacity(256);

    for family in families {
        let mut family_keys = FamilyKeys::default();
        walk_family(
            family,
            &mut bounds,
            &mut stats,
            |labels, extra, ts, fields| {
                scratch.clear();
                write_tag_set(&mut scratch, labels, extra);
                scratch.extend_from_slice(&ts.to_le_bytes());
                let mut group = None;
                for &(role, value) in fields {
                    let Some(key) = family_keys.get(role, &family.name, &mut keys) else {
                        continue;
                    };
                    let g = *group.get_or_insert_with(|| match index.get(scratch.as_slice()) {
                        Some(&g) => g,
                        None => {
                            index.insert(scratch.clone(), groups.len());
                            groups.push(Group {
                                timestamp_ms: ts,
                                fields: Vec::with_capacity(fields.len()),
                            });
                            groups.len() - 1
                        }
                    });
                    groups[g].fields.push((key, value));
                }
            },
        );
    }

    if escaped_measurement.is_empty() {
        // Every line would be refused ("missing measurement"); config validation prevents it.
        return stats;
    }
    // Lines come out in the order their tag set and timestamp first appeared.
    let mut tag_sets: Vec<(usize, Vec<u8>)> = index.into_iter().map(|(k, g)| (g, k)).collect();
    tag_sets.sort_unstable_by_key(|(g, _)| *g);
    for (g, key) in tag_sets {
        let group = &mut groups[g];
        // Stable, so among equal keys the last in the input stays last and wins below.
        group
            .fields
            .sort_by(|a, b| keys[a.0 as usize].cmp(&keys[b.0 as usize]));
        let tags = &key[..key.len().saturating_sub(8)];
        out.extend_from_slice(&escaped_measurement);
        out.extend_from_slice(tags);
        let mut separator = b' ';
        let fields = &group.fields;
        for (i, &(key_id, value)) in fields.iter().enumerate() {
            let key = &keys[key_id as usize];
            if fields
                .get(i + 1)
                .is_some_and(|next| next.0 == key_id || keys[next.0 as usize] == *key)
            {
                continue;
            }
            out.push(separator);
            separator = b',';
            out.extend_from_slice(key);
            out.push(b'=');
            write_value(out, value);
            stats.samples += 1;
        }
        write_timestamp(out, group.timestamp_ms);
        stats.lines += 1;
    }
    stats
}

/// Tag and field keys InfluxDB reserves: a point using one is discarded.
const RESERVED_KEYS: [&str; 3] = ["time", "_field", "_measurement"];

fn writable_tag(key: &str, value: &str) -> bool {
    !key.is_empty() && !value.is_empty() && !RESERVED_KEYS.contains(&key)
}

/// Writes `,key=value` for each tag, sorted by key, with `extra` in its place (replacing a
/// label of the same name, since InfluxDB refuses duplicate tag keys).
fn write_tag_set(out: &mut Vec<u8>, labels: &Labels, mut extra: ExtraTag<'_>) {
    for (key, value) in labels.iter() {
        if let Some((extra_key, extra_value)) = extra
            && extra_key <= key
        {
            write_tag(out, extra_key, extra_value);
            extra = None;
            if extra_key == key {
                continue;
            }
        }
        if writable_tag(key, value) {
            write_tag(out, key, value);
        }
    }
    if let Some((key, value)) = extra {
        write_tag(out, key, value);
    }
}

fn write_tag(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b',');
    write_escaped(out, key, Part::Tag);
    out.push(b'=');
    write_escaped(out, value, Part::Tag);
}

/// Writes " <ts>\n".
fn write_timestamp(out: &mut Vec<u8>, ts: i64) {
    // Writing into a Vec cannot fail.
    let _ = writeln!(out, " {ts}");
}

fn write_value(out: &mut Vec<u8>, value: FieldValue) {
    match value {
        FieldValue::Float(v) => write_float(out, v),
        // Bare digits: a float to InfluxDB, with the exact value of the count.
        FieldValue::Count(n) => {
            let _ = write!(out, "{n}");
        }
    }
}

/// Writes a finite `v` as a line-protocol float: the shortest digits that read back as `v`,
/// positional in `[1e-4, 1e16)` (no fraction for integral values: `1`, still a float without
/// the `i` suffix), with an exponent outside it (`1e300`, `5e-324`).
fn write_float(out: &mut Vec<u8>, v: f64) {
    let magnitude = v.abs();
    let _ = if magnitude == 0.0 || (1e-4..1e16).contains(&magnitude) {
        write!(out, "{v}")
    } else {
        // Debug switches to scientific notation outside [1e-4, 1e16) and is shortest too.
        write!(out, "{v:?}")
    };
}

/// Where a name goes in a line; each position escapes differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Measurement,
    /// Tag keys and tag values.
    Tag,
    FieldKey,
}

impl Part {
    /// Whether `b` must be written as `\b` here.
    fn escapes(self, b: u8) -> bool {
        match b {
            b',' | b' ' => true,
            b'=' => self != Part::Measurement,
            _ => false,
        }
    }

    /// Whether a backslash directly before `b` would be lost or break the line here (see the
    /// module doc). Tags carry `\` before an escaped character exactly.
    fn drops_backslash_before(self, b: u8) -> bool {
        match self {
            Part::Tag => false,
            Part::Measurement | Part::FieldKey => matches!(b, b',' | b' ' | b'=' | b'"'),
        }
    }
}

fn needs_care(b: u8) -> bool {
    matches!(b, b',' | b' ' | b'=' | b'\\' | b'\n' | b'\r' | b'#')
}

/// Appends `s` escaped for `part`. Works on bytes: every byte it treats specially is ASCII, and
/// UTF-8 never uses ASCII bytes inside a multi-byte character, so non-ASCII text passes intact.
fn write_escaped(out: &mut Vec<u8>, s: &str, part: Part) {
    let bytes = s.as_bytes();
    if !bytes.iter().copied().any(needs_care) {
        out.extend_from_slice(bytes);
        return;
    }
    if part == Part::Measurement && bytes.first() == Some(&b'#') {
        out.push(b'\\');
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            let start = i;
            while bytes.get(i) == Some(&b'\\') {
                i += 1;
            }
            let run = &bytes[start..i];
            match bytes.get(i) {
                // A final backslash would escape the separator that follows.
                None if part == Part::Tag => {
                    out.extend_from_slice(run);
                    out.extend_from_slice(b"\\ ");
                }
                None => {}
                Some(&next) if part.drops_backslash_before(next) => {}
                Some(_) => out.extend_from_slice(run),
            }
            continue;
        }
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if part.escapes(b) => out.extend_from_slice(&[b'\\', b]),
            b => out.push(b),
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picket_core::model::{Histogram, MetricType, Summary};

    use crate::test_support::labels;

    fn family(name: &str, kind: MetricType, points: Vec<(Labels, i64, Value)>) -> Family {
        crate::test_support::family(name, kind, "help", points)
    }

    fn gauge(name: &str, pairs: &[(&str, &str)], ts: i64, v: f64) -> Family {
        family(
            name,
            MetricType::Gauge,
            vec![(labels(pairs), ts, Value::Number(v))],
        )
    }

    fn run(families: &[Family], mapping: &Mapping) -> (String, LineStats) {
        let mut out = Vec::new();
        let stats = encode(families, mapping, &mut out);
        (String::from_utf8(out).unwrap(), stats)
    }

    fn by_family(families: &[Family]) -> (String, LineStats) {
        run(families, &Mapping::Family)
    }

    fn grouped(families: &[Family]) -> (String, LineStats) {
        run(
            families,
            &Mapping::Grouped {
                measurement: "prometheus".into(),
            },
        )
    }

    fn escaped(s: &str, part: Part) -> String {
        let mut out = Vec::new();
        write_escaped(&mut out, s, part);
        String::from_utf8(out).unwrap()
    }

    fn stats(lines: usize, samples: usize, dropped: usize, stale: usize) -> LineStats {
        LineStats {
            lines,
            samples,
            dropped_non_finite: dropped,
            skipped_stale: stale,
        }
    }

    // Expected outputs below were written to InfluxDB 1.6.7 and read back with SELECT, SHOW
    // SERIES and SHOW TAG VALUES; the comments say what the server stored.

    #[test]
    fn measurement_escaping() {
        let m = |s| escaped(s, Part::Measurement);
        assert_eq!(m("cpu"), "cpu");
        // Stored "a b,c".
        assert_eq!(m("a b,c"), r"a\ b\,c");
        // '=' and quotes need no escape in a measurement: stored `a=b"c"`.
        assert_eq!(m(r#"a=b"c""#), r#"a=b"c""#);
        // Backslash before an ordinary character: stored as is.
        assert_eq!(m(r"a\b"), r"a\b");
        assert_eq!(m(r"a\\b"), r"a\\b");
        // Before an escaped comma or space InfluxDB stores the series under one name and the
        // measurement under another (unqueryable); before '=' or '"' it drops the backslash.
        assert_eq!(m(r"a\,b"), r"a\,b");
        assert_eq!(m(r"a\\ b"), r"a\ b");
        assert_eq!(m(r"a\=b"), "a=b");
        assert_eq!(m(r#"a\"b"#), r#"a"b"#);
        // A final backslash would escape the separator: refused (`invalid field format`).
        assert_eq!(m(r"a\"), "a");
        assert_eq!(m(r"a\\"), "a");
        assert_eq!(m("a\nb\rc"), r"a\nb\rc");
        assert_eq!(m("naïve_€_😀"), "naïve_€_😀");
        // A line starting with '#' is a comment InfluxDB ignores (204, nothing stored).
        assert_eq!(m("#m"), r"\#m");
        assert_eq!(m("m#"), "m#");
        // A leading space would be trimmed; escaped it is kept: stored " m".
        assert_eq!(m(" m"), r"\ m");
    }

    #[test]
    fn tag_escaping() {
        let t = |s| escaped(s, Part::Tag);
        assert_eq!(t("plain"), "plain");
        // Stored "a b,c=d".
        assert_eq!(t("a b,c=d"), r"a\ b\,c\=d");
        // Quotes are literal in tags: stored `"a"b`.
        assert_eq!(t(r#""a"b"#), r#""a"b"#);
        // A backslash keeps its meaning before anything, including an escaped character:
        // `a\\,b` is stored as `a\,b`, `a\\\,b` as `a\\,b`.
        assert_eq!(t(r"a\b"), r"a\b");
        assert_eq!(t(r"a\,b"), r"a\\,b");
        assert_eq!(t(r"a\ b"), r"a\\ b");
        assert_eq!(t(r"a\=b"), r"a\\=b");
        assert_eq!(t(r"a\\,b"), r"a\\\,b");
        assert_eq!(t(r#"a\"b"#), r#"a\"b"#);
        // A final backslash cannot be written (`k=v\` and `k=v\\` are refused as `invalid tag
        // format`); an escaped space after it keeps it: stored `C:\ `.
        assert_eq!(t(r"C:\"), r"C:\\ ");
        assert_eq!(t(r"a\\"), r"a\\\ ");
        assert_eq!(t(r"\"), r"\\ ");
        // Stored as backslash + letter.
        assert_eq!(t("a\nb\r"), r"a\nb\r");
        assert_eq!(t("a\\\n"), r"a\\n");
        assert_eq!(t("Zürich 東京 😀"), r"Zürich\ 東京\ 😀");
        // Tabs and other control characters are accepted and stored by InfluxDB 1.x.
        assert_eq!(t("a\tb"), "a\tb");
        assert_eq!(t("#x"), "#x");
    }

    #[test]
    fn field_key_escaping() {
        let f = |s| escaped(s, Part::FieldKey);
        assert_eq!(f("value"), "value");
        // Stored "a b,c=d".
        assert_eq!(f("a b,c=d"), r"a\ b\,c\=d");
        // Quotes are literal in keys: stored `"a"b"`.
        assert_eq!(f(r#""a"b""#), r#""a"b""#);
        assert_eq!(f(r"a\b"), r"a\b");
        assert_eq!(f(r"a\\b"), r"a\\b");
        // The field scanner pairs backslashes while the key splitter looks one byte back:
        // `a\\,x=1`, `a\\ x=1`, `a\\=x=1` and `a\=1` are all refused.
        assert_eq!(f(r"a\,b"), r"a\,b");
        assert_eq!(f(r"a\ b"), r"a\ b");
        assert_eq!(f(r"a\=b"), r"a\=b");
        assert_eq!(f(r"a\"), "a");
        // `\"` is unescaped in field keys: the backslash would be lost anyway.
        assert_eq!(f(r#"a\"b"#), r#"a"b"#);
        assert_eq!(f("a\nb\rc"), r"a\nb\rc");
        assert_eq!(f("größe_µs"), "größe_µs");
        assert_eq!(f("#x"), "#x");
    }

    #[test]
    fn escaping_in_whole_lines() {
        let families = [gauge(
            "m",
            &[("path", r"C:\"), ("k y", "a,b=c"), ("q", "\"x\"\n")],
            1000,
            1.0,
        )];
        let (text, s) = by_family(&families);
        assert_eq!(
            text,
            "m,k\\ y=a\\,b\\=c,path=C:\\\\ ,q=\"x\"\\n value=1 1000\n"
        );
        assert_eq!(s, stats(1, 1, 0, 0));

        let families = [gauge("odd\\ name", &[], 5, 2.5)];
        let (text, _) = run(
            &families,
            &Mapping::Grouped {
                measurement: "my m,x".into(),
            },
        );
        assert_eq!(text, "my\\ m\\,x odd\\ name=2.5 5\n");
    }

    #[test]
    fn tags_sorted_empty_and_reserved_left_out() {
        let families = [gauge(
            "m",
            &[
                ("zone", "b"),
                ("app", "x"),
                ("empty", ""),
                ("time", "now"),
                ("_field", "f"),
                ("_measurement", "m"),
                ("mid", "y"),
            ],
            7,
            3.0,
        )];
        let (text, _) = by_family(&families);
        assert_eq!(text, "m,app=x,mid=y,zone=b value=3 7\n");
        let (text, _) = grouped(&families);
        assert_eq!(text, "prometheus,app=x,mid=y,zone=b m=3 7\n");

        // All tags empty: no tag set at all.
        let families = [gauge("m", &[("a", ""), ("b", "")], 7, 3.0)];
        assert_eq!(by_family(&families).0, "m value=3 7\n");
    }

    #[test]
    fn extra_tags_sorted_in_and_replace_labels() {
        let summary = Value::Summary(Summary {
            count: 2,
            sum: 3.0,
            quantiles: vec![(0.5, 1.0)],
        });
        let families = [family(
            "s",
            MetricType::Summary,
            vec![(
                labels(&[("a", "1"), ("quantile", "bogus"), ("z", "2")]),
                9,
                summary,
            )],
        )];
        let (text, _) = by_family(&families);
        assert_eq!(
            text,
            "s,a=1,quantile=bogus,z=2 count=2,sum=3 9\n\
             s,a=1,quantile=0.5,z=2 value=1 9\n"
        );

        let histogram = Value::Histogram(Histogram {
            count: 1,
            sum: 1.0,
            buckets: vec![(1.0, 1)],
        });
        let families = [family(
            "h",
            MetricType::Histogram,
            vec![(labels(&[("job", "j"), ("zz", "z")]), 9, histogram)],
        )];
        let (text, _) = by_family(&families);
        assert_eq!(
            text,
            "h,job=j,zz=z count=1,sum=1 9\n\
             h,job=j,le=1,zz=z bucket=1 9\n\
             h,job=j,le=+Inf,zz=z bucket=1 9\n"
        );
    }

    fn summary_family() -> Family {
        family(
            "lat",
            MetricType::Summary,
            vec![(
                labels(&[("job", "j")]),
                1000,
                Value::Summary(Summary {
                    count: 10,
                    sum: 2.5,
                    quantiles: vec![(0.0, 0.1), (0.5, 0.25), (0.999, 1.0), (1.0, 2.0)],
                }),
            )],
        )
    }

    fn histogram_family(buckets: Vec<(f64, u64)>) -> Family {
        family(
            "req",
            MetricType::Histogram,
            vec![(
                labels(&[("job", "j")]),
                1000,
                Value::Histogram(Histogram {
                    count: 4,
                    sum: 7.5,
                    buckets,
                }),
            )],
        )
    }

    #[test]
    fn summary_by_family() {
        let (text, s) = by_family(&[summary_family()]);
        assert_eq!(
            text,
            "lat,job=j count=10,sum=2.5 1000\n\
             lat,job=j,quantile=0 value=0.1 1000\n\
             lat,job=j,quantile=0.5 value=0.25 1000\n\
             lat,job=j,quantile=0.999 value=1 1000\n\
             lat,job=j,quantile=1 value=2 1000\n"
        );
        assert_eq!(s, stats(5, 6, 0, 0));
    }

    #[test]
    fn summary_grouped() {
        let (text, s) = grouped(&[summary_family()]);
        assert_eq!(
            text,
            "prometheus,job=j lat_count=10,lat_sum=2.5 1000\n\
             prometheus,job=j,quantile=0 lat=0.1 1000\n\
             prometheus,job=j,quantile=0.5 lat=0.25 1000\n\
             prometheus,job=j,quantile=0.999 lat=1 1000\n\
             prometheus,job=j,quantile=1 lat=2 1000\n"
        );
        assert_eq!(s, stats(5, 6, 0, 0));
    }

    #[test]
    fn histogram_by_family_adds_inf_bucket() {
        let (text, s) = by_family(&[histogram_family(vec![(0.5, 1), (1.0, 3)])]);
        assert_eq!(
            text,
            "req,job=j count=4,sum=7.5 1000\n\
             req,job=j,le=0.5 bucket=1 1000\n\
             req,job=j,le=1 bucket=3 1000\n\
             req,job=j,le=+Inf bucket=4 1000\n"
        );
        assert_eq!(s, stats(4, 5, 0, 0));
    }

    #[test]
    fn histogram_with_inf_bucket_or_none() {
        let (text, s) = by_family(&[histogram_family(vec![(1.0, 3), (f64::INFINITY, 4)])]);
        assert_eq!(
            text,
            "req,job=j count=4,sum=7.5 1000\n\
             req,job=j,le=1 bucket=3 1000\n\
             req,job=j,le=+Inf bucket=4 1000\n"
        );
        assert_eq!(s, stats(3, 4, 0, 0));

        let (text, _) = by_family(&[histogram_family(Vec::new())]);
        assert_eq!(
            text,
            "req,job=j count=4,sum=7.5 1000\nreq,job=j,le=+Inf bucket=4 1000\n"
        );
    }

    #[test]
    fn histogram_grouped() {
        let (text, s) = grouped(&[histogram_family(vec![(0.5, 1), (1.0, 3)])]);
        assert_eq!(
            text,
            "prometheus,job=j req_count=4,req_sum=7.5 1000\n\
             prometheus,job=j,le=0.5 req_bucket=1 1000\n\
             prometheus,job=j,le=1 req_bucket=3 1000\n\
             prometheus,job=j,le=+Inf req_bucket=4 1000\n"
        );
        assert_eq!(s, stats(4, 5, 0, 0));
    }

    #[test]
    fn grouped_merges_same_tags_and_timestamp() {
        let families = [
            gauge("mem_used", &[("host", "a")], 1000, 5.0),
            gauge("cpu", &[("host", "a")], 1000, 0.5),
            gauge("cpu", &[("host", "b")], 1000, 0.7),
            gauge("cpu", &[("host", "a")], 2000, 0.6),
            // Empty values are left out, so this shares host=a's tag set.
            gauge("disk", &[("host", "a"), ("dev", "")], 1000, 9.0),
            histogram_family(vec![(1.0, 2)]),
            summary_family(),
        ];
        let (text, s) = grouped(&families);
        assert_eq!(
            text,
            "prometheus,host=a cpu=0.5,disk=9,mem_used=5 1000\n\
             prometheus,host=b cpu=0.7 1000\n\
             prometheus,host=a cpu=0.6 2000\n\
             prometheus,job=j lat_count=10,lat_sum=2.5,req_count=4,req_sum=7.5 1000\n\
             prometheus,job=j,le=1 req_bucket=2 1000\n\
             prometheus,job=j,le=+Inf req_bucket=4 1000\n\
             prometheus,job=j,quantile=0 lat=0.1 1000\n\
             prometheus,job=j,quantile=0.5 lat=0.25 1000\n\
             prometheus,job=j,quantile=0.999 lat=1 1000\n\
             prometheus,job=j,quantile=1 lat=2 1000\n"
        );
        assert_eq!(s, stats(10, 15, 0, 0));
    }

    #[test]
    fn grouped_duplicate_field_last_wins() {
        let families = [
            gauge("x", &[("k", "v")], 1, 1.0),
            gauge("a", &[("k", "v")], 1, 2.0),
            gauge("x", &[("k", "v")], 1, 3.0),
            // A gauge whose name collides with a histogram's `_count` field.
            gauge("req_count", &[("job", "j")], 1000, 99.0),
            histogram_family(Vec::new()),
        ];
        let (text, s) = grouped(&families);
        assert_eq!(
            text,
            "prometheus,k=v a=2,x=3 1\n\
             prometheus,job=j req_count=4,req_sum=7.5 1000\n\
             prometheus,job=j,le=+Inf req_bucket=4 1000\n"
        );
        assert_eq!(s, stats(3, 5, 0, 0));
    }

    #[test]
    fn grouped_reserved_field_keys_left_out() {
        let families = [
            gauge("time", &[("k", "v")], 1, 1.0),
            gauge("_field", &[("k", "v")], 1, 1.0),
            gauge("ok", &[("k", "v")], 1, 2.0),
            // Only a reserved key: no line at all.
            gauge("_measurement", &[("k", "w")], 1, 1.0),
        ];
        let (text, s) = grouped(&families);
        assert_eq!(text, "prometheus,k=v ok=2 1\n");
        assert_eq!(s, stats(1, 1, 0, 0));
        // As a measurement `time` is fine.
        assert_eq!(by_family(&families[..1]).0, "time,k=v value=1 1\n");
    }

    fn non_finite_families() -> Vec<Family> {
        vec![
            family(
                "g",
                MetricType::Gauge,
                vec![
                    (labels(&[("k", "v")]), 1, Value::Number(f64::NAN)),
                    (labels(&[("k", "v")]), 2, Value::Number(f64::INFINITY)),
                    (labels(&[("k", "v")]), 3, Value::Number(f64::NEG_INFINITY)),
                    (labels(&[("k", "v")]), 4, Value::Number(1.5)),
                ],
            ),
            family(
                "s",
                MetricType::Summary,
                vec![(
                    labels(&[("k", "v")]),
                    4,
                    Value::Summary(Summary {
                        count: 3,
                        sum: f64::NAN,
                        quantiles: vec![(0.5, f64::NAN), (0.9, 2.0)],
                    }),
                )],
            ),
            family(
                "h",
                MetricType::Histogram,
                vec![(
                    labels(&[("k", "v")]),
                    4,
                    Value::Histogram(Histogram {
                        count: 1,
                        sum: f64::INFINITY,
                        buckets: vec![(f64::INFINITY, 1)],
                    }),
                )],
            ),
        ]
    }

    #[test]
    fn non_finite_dropped_by_family() {
        let (text, s) = by_family(&non_finite_families());
        assert_eq!(
            text,
            "g,k=v value=1.5 4\n\
             s,k=v count=3 4\n\
             s,k=v,quantile=0.9 value=2 4\n\
             h,k=v count=1 4\n\
             h,k=v,le=+Inf bucket=1 4\n"
        );
        assert_eq!(s, stats(5, 5, 6, 0));
    }

    #[test]
    fn non_finite_dropped_grouped_keeps_other_fields() {
        let (text, s) = grouped(&non_finite_families());
        assert_eq!(
            text,
            "prometheus,k=v g=1.5,h_count=1,s_count=3 4\n\
             prometheus,k=v,quantile=0.9 s=2 4\n\
             prometheus,k=v,le=+Inf h_bucket=1 4\n"
        );
        assert_eq!(s, stats(3, 5, 6, 0));

        // Nothing finite: no line, nothing written.
        let families = [gauge("g", &[], 1, f64::NAN)];
        let (text, s) = grouped(&families);
        assert_eq!(text, "");
        assert_eq!(s, stats(0, 0, 1, 0));
    }

    #[test]
    fn stale_skipped() {
        let families = [
            family(
                "g",
                MetricType::Gauge,
                vec![
                    (labels(&[("k", "v")]), 1, Value::Stale),
                    (labels(&[("k", "v")]), 2, Value::Number(1.0)),
                ],
            ),
            family(
                "s",
                MetricType::Summary,
                vec![(labels(&[]), 3, Value::Stale)],
            ),
        ];
        let (text, s) = by_family(&families);
        assert_eq!(text, "g,k=v value=1 2\n");
        assert_eq!(s, stats(1, 1, 0, 2));
        let (text, s) = grouped(&families);
        assert_eq!(text, "prometheus,k=v g=1 2\n");
        assert_eq!(s, stats(1, 1, 0, 2));
    }

    #[test]
    fn float_formatting() {
        let f = |v: f64| {
            let mut out = Vec::new();
            write_float(&mut out, v);
            String::from_utf8(out).unwrap()
        };
        // All stored by InfluxDB 1.6.7 as floats (SHOW FIELD KEYS: float) with these values.
        assert_eq!(f(1.0), "1");
        assert_eq!(f(0.0), "0");
        assert_eq!(f(-0.0), "-0");
        assert_eq!(f(-42.0), "-42");
        assert_eq!(f(0.1), "0.1");
        assert_eq!(f(1.5e-4), "0.00015");
        assert_eq!(f(1e-5), "1e-5");
        assert_eq!(f(123456789012345.0), "123456789012345");
        assert_eq!(f(9007199254740993.0), "9007199254740992");
        assert_eq!(f(1e16), "1e16");
        assert_eq!(f(1e300), "1e300");
        assert_eq!(f(5e-324), "5e-324");
        assert_eq!(f(f64::MAX), "1.7976931348623157e308");
        assert_eq!(f(f64::MIN), "-1.7976931348623157e308");
        for v in [0.1, 1.0 / 3.0, 2.5e-7, 6.02214076e23, -1e-310] {
            assert_eq!(f(v).parse::<f64>().unwrap(), v);
        }

        let families = [family(
            "s",
            MetricType::Summary,
            vec![(
                labels(&[]),
                -1000,
                Value::Summary(Summary {
                    count: u64::MAX,
                    sum: 1e20,
                    quantiles: Vec::new(),
                }),
            )],
        )];
        // Counts keep their exact digits; negative timestamps (before 1970) are valid.
        assert_eq!(
            by_family(&families).0,
            "s count=18446744073709551615,sum=1e20 -1000\n"
        );
    }

    #[test]
    fn appends_to_existing_output() {
        let mut out = b"x value=1 1\n".to_vec();
        let s = encode(&[gauge("y", &[], 2, 2.0)], &Mapping::Family, &mut out);
        assert_eq!(out, b"x value=1 1\ny value=2 2\n");
        assert_eq!(s.lines, 1);
    }

    #[test]
    fn huge_batch() {
        const POINTS: usize = 100_000;
        let mut numbers = Family::new("flink_records_in", MetricType::Counter, "");
        for i in 0..POINTS {
            let subtask = (i % 1000).to_string();
            numbers.push(
                labels(&[("job", "etl"), ("subtask", &subtask)]),
                (i / 1000) as i64 * 1000,
                i as f64,
            );
        }
        let mut lags = Family::new("flink_lag", MetricType::Gauge, "");
        lags.points = numbers.points.clone();
        if let Some(p) = lags.points.get_mut(0) {
            p.value = Value::Number(f64::NAN);
        }
        if let Some(p) = lags.points.get_mut(1) {
            p.value = Value::Stale;
        }
        let families = [numbers, lags];

        let mut out = Vec::new();
        let s = encode(&families, &Mapping::Family, &mut out);
        assert_eq!(s, stats(2 * POINTS - 2, 2 * POINTS - 2, 1, 1));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), s.lines);
        assert!(out.starts_with(b"flink_records_in,job=etl,subtask=0 value=0 0\n"));

        // Grouped: both families share every tag set and timestamp.
        let mut out = Vec::new();
        let s = encode(
            &families,
            &Mapping::Grouped {
                measurement: "flink".into(),
            },
            &mut out,
        );
        assert_eq!(s, stats(POINTS, 2 * POINTS - 2, 1, 1));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), POINTS);
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("flink,job=etl,subtask=0 flink_records_in=0 0")
        );
        assert_eq!(
            lines.next(),
            Some("flink,job=etl,subtask=1 flink_records_in=1 0")
        );
        assert_eq!(
            lines.next(),
            Some("flink,job=etl,subtask=2 flink_lag=2,flink_records_in=2 0")
        );
    }

    #[test]
    fn measurement_names_that_would_not_read_back() {
        assert_eq!(measurement_problem("prometheus"), None);
        assert_eq!(measurement_problem("flink metrics, prod"), None);
        assert!(measurement_problem("").is_some());
        assert!(measurement_problem("#m").is_some());
        assert!(measurement_problem("a\nb").is_some());
        assert!(measurement_problem(r"a\b").is_some());
    }
}
