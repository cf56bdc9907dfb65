//! A parser of InfluxDB line protocol as InfluxDB 1.x's `/write` endpoint reads it, for the
//! InfluxDB-compatible receiver that Flink's `InfluxdbReporter` (the influxdb-java client) and
//! other line-protocol writers post to. It turns lines into Picket families; the receiver
//! decides what to answer.
//!
//! # Mapping
//!
//! Every numeric field of a line becomes one sample, at the line's timestamp:
//!
//! * **Name**: the measurement when the field key is `value`, `<measurement>_<field key>`
//!   otherwise (Flink writes gauges as `value`, counters as `count`, meters as `count` and
//!   `rate`, histograms as `count`, `min`, `max`, `mean`, `stddev` and `p50` … `p999`). The
//!   name is then made a Prometheus name: each character outside `[a-zA-Z0-9_:]` becomes `_`
//!   (one `_` per character, also for non-ASCII ones) and a name starting with a digit gets a
//!   `_` in front.
//! * **Labels**: the tags. Names are made Prometheus label names the same way, except that `:`
//!   becomes `_` too; a name starting with `__` (reserved in Prometheus, `__name__` is the
//!   metric name) keeps a single leading `_` (`__name__` → `_name__`). Values are kept as they
//!   are, after unescaping. A tag with an empty key or value (`k=`, `=v`) is left out (InfluxDB
//!   refuses such lines; an absent tag is how it says "no value"). When two tags give the same
//!   label name (a repeated key, or `a-b` and `a.b`) the line is refused, as InfluxDB refuses
//!   repeated tag keys.
//! * **Family**: one per metric name, [`MetricType::Untyped`] with empty help, in the order
//!   names first appear; points in line order. Lines with the same series and timestamp are all
//!   kept, in order.
//!
//! # Values
//!
//! * Floats: `-?digits[.digits][e[+-]digits]`, also `.5` and `1.`, as InfluxDB reads them. A
//!   leading `+`, `NaN`, `Inf`, hex and anything else, or a float that overflows `f64` (`1e400`),
//!   is an error for the line, as in InfluxDB.
//! * Integers `12i`, `-12i` (within `i64`), unsigned `12u` (within `u64`; InfluxDB 1.x refuses
//!   `u` unless built with unsigned support, 2.x accepts it). Both become `f64`, so above 2^53
//!   they lose their last digits.
//! * Booleans `t`, `T`, `true`, `True`, `TRUE` → 1; `f`, `F`, `false`, `False`, `FALSE` → 0.
//! * Strings (`"..."`, with `\"` and `\\` escaped) are left out and counted in
//!   [`Parsed::skipped_fields`]. A line with only strings gives no sample but is no error.
//!
//! A field key repeated on a line: the last one wins, as in InfluxDB (which keeps fields in a
//! map); only that one is a sample (or a skipped string). Two different keys that give the
//! same metric name (`a-b`, `a_b`) are two samples, like two lines.
//!
//! # Timestamps
//!
//! An optional integer after the fields, in the `precision` of the request, converted to
//! milliseconds rounding down (toward negative infinity: `-1` ns is `-1` ms). As in InfluxDB,
//! it must fit in nanoseconds since the epoch (1677-09-21 to 2262-04-11, InfluxDB reserves the
//! two lowest and the highest values): anything outside is an error, for every precision. A line
//! without one gets `now_ms`, cut to whole seconds, minutes or hours for those precisions as
//! InfluxDB does.
//!
//! # Syntax and escaping
//!
//! `measurement[,tag=value...] field=value[,field=value...] [timestamp]`, as in InfluxDB 1.x:
//!
//! * A backslash escapes: `,` and space in measurements (and `=` and `"`, which InfluxDB also
//!   unescapes there); `,`, space and `=` in tag keys and values; `,`, space, `=` and `"` in
//!   field keys. Before any other character, including another backslash, it is kept as it is
//!   (`a\\,b` is `a\,b`). A separator is escaped when the byte before it is a backslash,
//!   however many backslashes there are (so a name cannot end in a backslash), which is how
//!   InfluxDB scans.
//! * An unescaped `=` in a tag value, a tag or field without `=`, a field without value, an
//!   unterminated string or text after a closing quote, a bad number, boolean or timestamp,
//!   text after the timestamp: the line is an error ([`Parsed::errors`]) and the others are
//!   still parsed.
//! * Whitespace: leading spaces and tabs are skipped; the measurement and tags end at the first
//!   unescaped space; more spaces or tabs may follow before the fields and before the
//!   timestamp, and after it (InfluxDB skips them too). A tab is not a separator elsewhere.
//! * Lines starting with `#` (after whitespace) are comments; blank lines are skipped; a `\r`
//!   before the `\n` is dropped (InfluxDB 1.x would refuse the line; Windows clients send it).
//! * A newline ends the line, except inside a string field value, where InfluxDB 1.x takes it
//!   as part of the string (its documentation says otherwise, its scanner does this, and
//!   influxdb-java writes such strings unescaped): the line goes on. Line numbers in errors
//!   count physical lines. When a string is not closed before the end of the body, InfluxDB
//!   would swallow everything after it; here the line ends at its first newline and is an error,
//!   and the next lines are parsed.
//! * A line that is not UTF-8 is an error.
//!
//! * A line whose tags, copied into each of its numeric fields, would make more than 16 times
//!   the line's length in label bytes (a few tags with a few fields never do) is an error, so
//!   a body cannot expand without bound in memory. So is a line with more than 128 tags
//!   (`MAX_LABELS_PER_SERIES`, the limit of labels per series on Picket's wire), which also
//!   keeps reading a line's tags linear.
//!
//! Not checked: InfluxDB's 64 KiB series key limit, and its reserved `time` tag and field keys
//! (InfluxDB drops such points; the names mean nothing to Picket, so they are kept).

use std::collections::HashMap;

use picket_core::codec::MAX_LABELS_PER_SERIES;
use picket_core::model::{Family, Labels, MetricType};

/// How many times its own length in label bytes one line may make (tags × numeric fields).
const EXPANSION_FACTOR: usize = 16;

/// The unit of timestamps in a request, from `/write`'s `precision` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// From the `precision` query parameter of /write: "n"/"ns", "u"/"us"/"µ", "ms", "s", "m",
    /// "h"; None (or an empty value, as InfluxDB reads it) → nanoseconds (InfluxDB's default).
    /// Err(message) for anything else (InfluxDB 1.x would silently read it as nanoseconds).
    pub fn from_param(p: Option<&str>) -> Result<Precision, String> {
        Ok(match p.unwrap_or("") {
            "" | "n" | "ns" => Precision::Nanoseconds,
            // The micro sign and the Greek letter mu look the same.
            "u" | "us" | "\u{b5}" | "\u{3bc}" => Precision::Microseconds,
            "ms" => Precision::Milliseconds,
            "s" => Precision::Seconds,
            "m" => Precision::Minutes,
            "h" => Precision::Hours,
            other => {
                return Err(format!(
                    "invalid precision {}: expected n, ns, u, us, µ, ms, s, m or h",
                    quoted(other)
                ));
            }
        })
    }

    fn nanos(self) -> i64 {
        match self {
            Precision::Nanoseconds => 1,
            Precision::Microseconds => 1_000,
            Precision::Milliseconds => NANOS_PER_MS,
            Precision::Seconds => 1_000_000_000,
            Precision::Minutes => 60_000_000_000,
            Precision::Hours => 3_600_000_000_000,
        }
    }
}

/// One line that could not be used: 1-based line number, an excerpt (at most ~100 chars,
/// char-boundary safe) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub excerpt: String,
    pub reason: String,
}

/// What [`parse`] made of a body.
#[derive(Debug, Default)]
pub struct Parsed {
    /// One family per metric name, in first-seen order; points in line order.
    pub families: Vec<Family>,
    /// Numeric samples produced.
    pub points: usize,
    /// String fields (and other non-numeric) that were left out.
    pub skipped_fields: usize,
    /// Lines that could not be parsed at all.
    pub errors: Vec<LineError>,
}

/// Parses `body` (UTF-8 line protocol; invalid UTF-8 in a line is that line's error).
/// `now_ms` stamps lines without a timestamp.
pub fn parse(body: &[u8], precision: Precision, now_ms: i64) -> Parsed {
    let mut builder = Builder::new(precision, now_ms);
    let mut pos = 0;
    let mut line = 1;
    while pos < body.len() {
        let end = line_end(body, pos);
        let text = &body[pos..end];
        builder.line(text, line);
        // A string field may have carried the line over several physical lines.
        line += 1 + text.iter().filter(|&&b| b == b'\n').count();
        pos = end + 1;
    }
    builder.parsed
}

const NANOS_PER_MS: i64 = 1_000_000;
/// InfluxDB's time range: it keeps the two lowest and the highest nanosecond for itself.
const MIN_NANOS: i64 = i64::MIN + 2;
const MAX_NANOS: i64 = i64::MAX - 1;

/// Characters a backslash escapes, per position (see the module doc).
const MEASUREMENT_ESCAPES: &[u8] = b", =\"";
const TAG_ESCAPES: &[u8] = b", =";
const FIELD_KEY_ESCAPES: &[u8] = b", =\"";

const EXCERPT_CHARS: usize = 100;
/// How much of a name or value an error message quotes.
const QUOTE_CHARS: usize = 40;

/// Whether the byte at `i` is escaped: InfluxDB looks at the byte before it only.
fn escaped(b: &[u8], i: usize) -> bool {
    i > 0 && b[i - 1] == b'\\'
}

fn skip_blank(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

/// The index of the first `\n` at or after `from`, or `b.len()`.
fn next_newline(b: &[u8], from: usize) -> usize {
    b.get(from..)
        .and_then(|rest| rest.iter().position(|&c| c == b'\n'))
        .map_or(b.len(), |i| from + i)
}

/// Where the line starting at `start` ends: the index of its `\n`, or the end of the body.
fn line_end(body: &[u8], start: usize) -> usize {
    let newline = next_newline(body, start);
    if !body[start..newline].contains(&b'"') {
        return newline;
    }
    // Only a string field value can carry a line past a newline. An unterminated one ends the
    // line at its first newline (and the parser reports it).
    quoted_line_end(body, start).unwrap_or(newline)
}

/// [`line_end`] for a line with a quote: follows the line's structure as the parser does, to
/// know whether a `"` opens a string value. None when a string is not closed before the end.
fn quoted_line_end(body: &[u8], start: usize) -> Option<usize> {
    let n = body.len();
    let mut i = skip_blank(body, start);
    if body.get(i) == Some(&b'#') {
        return Some(next_newline(body, i));
    }
    // Measurement and tags, up to the first unescaped space.
    loop {
        match body.get(i) {
            None => return Some(n),
            Some(b'\n') => return Some(i),
            Some(b' ') if !escaped(body, i) => break,
            Some(_) => i += 1,
        }
    }
    i = skip_blank(body, i);
    loop {
        // A field key, up to an unescaped '='.
        loop {
            match body.get(i) {
                None => return Some(n),
                Some(b'\n') => return Some(i),
                Some(b'=') if !escaped(body, i) => {
                    i += 1;
                    break;
                }
                // Malformed; the parser says how.
                Some(b' ' | b',') if !escaped(body, i) => return Some(next_newline(body, i)),
                Some(_) => i += 1,
            }
        }
        if body.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match body.get(i) {
                    None => return None,
                    Some(b'\\') => i += 2,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        }
        // The rest of the value.
        loop {
            match body.get(i) {
                None => return Some(n),
                Some(b'\n') => return Some(i),
                Some(b',') => {
                    i += 1;
                    break;
                }
                Some(b' ') => return Some(next_newline(body, i)),
                Some(_) => i += 1,
            }
        }
    }
}

/// A field of the line being parsed: its unescaped key (a range of `Builder::keys`), its value
/// (None for a string) and whether a later field with the same key replaces it.
struct Field {
    key: (usize, usize),
    value: Option<f64>,
    replaced: bool,
}

/// Builds families line by line, reusing its buffers between lines.
struct Builder {
    precision: Precision,
    now_ms: i64,
    parsed: Parsed,
    /// Metric name → index in `parsed.families`.
    index: HashMap<String, usize>,
    scratch: String,
    /// The sanitised measurement of the current line.
    base: String,
    name: String,
    /// The unescaped field keys of the current line, one after the other.
    keys: String,
    fields: Vec<Field>,
    order: Vec<usize>,
}

impl Builder {
    fn new(precision: Precision, now_ms: i64) -> Self {
        Builder {
            precision,
            now_ms,
            parsed: Parsed::default(),
            index: HashMap::new(),
            scratch: String::new(),
            base: String::new(),
            name: String::new(),
            keys: String::new(),
            fields: Vec::new(),
            order: Vec::new(),
        }
    }

    /// One line (without its `\n`), numbered `number`.
    fn line(&mut self, text: &[u8], number: usize) {
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let text = &text[skip_blank(text, 0)..];
        if text.is_empty() || text.first() == Some(&b'#') {
            return;
        }
        let result = match std::str::from_utf8(text) {
            Ok(line) => self.parse_line(line),
            Err(_) => Err("invalid UTF-8".to_owned()),
        };
        if let Err(reason) = result {
            self.parsed.errors.push(LineError {
                line: number,
                excerpt: excerpt(text),
                reason,
            });
        }
    }

    /// Parses a non-blank line starting with its measurement and adds its samples, or says
    /// why it cannot. All cuts into `line` are next to ASCII delimiters, so on char boundaries.
    fn parse_line(&mut self, line: &str) -> Result<(), String> {
        let b = line.as_bytes();
        let len = b.len();

        // Measurement.
        if b.first() == Some(&b',') {
            return Err("missing measurement".into());
        }
        let mut i = 0;
        while i < len && (escaped(b, i) || !matches!(b[i], b',' | b' ')) {
            i += 1;
        }
        if i == len {
            return Err("missing fields".into());
        }
        self.scratch.clear();
        unescape_into(&mut self.scratch, &line[..i], MEASUREMENT_ESCAPES);
        self.base.clear();
        if self.scratch.starts_with(|c: char| c.is_ascii_digit()) {
            self.base.push('_');
        }
        push_sanitized(&mut self.base, &self.scratch, true);

        // Tags.
        let mut labels = Labels::new();
        if b[i] == b',' {
            loop {
                i += 1;
                let key_start = i;
                loop {
                    match b.get(i) {
                        Some(b'=') if !escaped(b, i) => break,
                        Some(b',' | b' ') if escaped(b, i) => i += 1,
                        Some(b',' | b' ') | None => {
                            return Err(format!("tag {} has no '='", quoted(&line[key_start..i])));
                        }
                        Some(_) => i += 1,
                    }
                }
                let key = &line[key_start..i];
                i += 1;
                let value_start = i;
                loop {
                    match b.get(i) {
                        Some(b',' | b' ') if !escaped(b, i) => break,
                        Some(b'=') if !escaped(b, i) => {
                            return Err(format!(
                                "unescaped '=' in the value of tag {}",
                                quoted(key)
                            ));
                        }
                        None => return Err("missing fields".into()),
                        Some(_) => i += 1,
                    }
                }
                self.add_tag(&mut labels, key, &line[value_start..i])?;
                if b[i] == b' ' {
                    break;
                }
            }
        }

        // Fields.
        i = skip_blank(b, i + 1);
        if i == len {
            return Err("missing fields".into());
        }
        self.keys.clear();
        self.fields.clear();
        loop {
            let key_start = i;
            loop {
                match b.get(i) {
                    Some(b'=') if !escaped(b, i) => break,
                    Some(b',' | b' ') if escaped(b, i) => i += 1,
                    Some(b',' | b' ') | None => {
                        return Err(if i == key_start {
                            "missing field key".into()
                        } else {
                            format!("field {} has no '='", quoted(&line[key_start..i]))
                        });
                    }
                    Some(_) => i += 1,
                }
            }
            let raw_key = &line[key_start..i];
            if raw_key.is_empty() {
                return Err("missing field key".into());
            }
            i += 1;
            let value = match b.get(i) {
                None | Some(b',' | b' ') => {
                    return Err(format!("field {} has no value", quoted(raw_key)));
                }
                Some(b'"') => {
                    i += 1;
                    loop {
                        match b.get(i) {
                            None => {
                                return Err(format!(
                                    "field {}: unterminated string",
                                    quoted(raw_key)
                                ));
                            }
                            Some(b'\\') => i += 2,
                            Some(b'"') => break,
                            Some(_) => i += 1,
                        }
                    }
                    i += 1;
                    if !matches!(b.get(i), None | Some(b',' | b' ')) {
                        return Err(format!(
                            "field {}: text after the closing quote",
                            quoted(raw_key)
                        ));
                    }
                    None
                }
                Some(_) => {
                    let start = i;
                    while i < len && b[i] != b',' && b[i] != b' ' {
                        i += 1;
                    }
                    let value = parse_value(&line[start..i])
                        .map_err(|e| format!("field {}: {e}", quoted(raw_key)))?;
                    Some(value)
                }
            };
            let key_from = self.keys.len();
            unescape_into(&mut self.keys, raw_key, FIELD_KEY_ESCAPES);
            self.fields.push(Field {
                key: (key_from, self.keys.len()),
                value,
                replaced: false,
            });
            if b.get(i) == Some(&b',') {
                i += 1;
            } else {
                break;
            }
        }

        // Timestamp.
        let start = skip_blank(b, i);
        let timestamp_ms = if start == len {
            self.default_timestamp()
        } else {
            let mut end = start;
            while end < len && !matches!(b[end], b' ' | b'\t') {
                end += 1;
            }
            if skip_blank(b, end) != len {
                return Err("unexpected text after the timestamp".into());
            }
            self.timestamp(&line[start..end])?
        };

        self.mark_replaced_fields();
        // Every numeric field gets its own copy of the tags: bound what one line can make.
        let tag_bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        let numeric = self
            .fields
            .iter()
            .filter(|f| !f.replaced && f.value.is_some())
            .count();
        let budget = EXPANSION_FACTOR * line.len().max(1024);
        if tag_bytes.saturating_mul(numeric) > budget {
            return Err(format!(
                "{numeric} fields × {tag_bytes} bytes of tags is more than {budget} bytes of labels; split the line"
            ));
        }
        self.emit(labels, timestamp_ms);
        Ok(())
    }

    fn add_tag(&mut self, labels: &mut Labels, key: &str, value: &str) -> Result<(), String> {
        if key.is_empty() || value.is_empty() {
            return Ok(());
        }
        self.scratch.clear();
        unescape_into(&mut self.scratch, key, TAG_ESCAPES);
        let name = label_name(&self.scratch);
        if labels.contains(&name) {
            return Err(format!(
                "two tags give label {} (a repeated tag key, or keys that differ only in \
                 characters a label name cannot have)",
                quoted(&name)
            ));
        }
        // Each insert into the sorted label set is linear: bound the line's tags before the
        // whole line is (a million tags would take hours).
        if labels.len() == MAX_LABELS_PER_SERIES {
            return Err(format!(
                "more than {MAX_LABELS_PER_SERIES} tags (Picket's limit of labels per series)"
            ));
        }
        let mut unescaped = String::with_capacity(value.len());
        unescape_into(&mut unescaped, value, TAG_ESCAPES);
        labels.insert(name, unescaped);
        Ok(())
    }

    fn timestamp(&self, token: &str) -> Result<i64, String> {
        let digits = token.strip_prefix('-').unwrap_or(token);
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("invalid timestamp {}", quoted(token)));
        }
        token
            .parse::<i64>()
            .ok()
            .and_then(|t| t.checked_mul(self.precision.nanos()))
            .filter(|ns| (MIN_NANOS..=MAX_NANOS).contains(ns))
            .map(|ns| ns.div_euclid(NANOS_PER_MS))
            .ok_or_else(|| {
                format!(
                    "timestamp {} out of range (1677-09-21 to 2262-04-11)",
                    quoted(token)
                )
            })
    }

    /// `now_ms`, cut to the precision's unit as InfluxDB does for points without a time.
    fn default_timestamp(&self) -> i64 {
        let unit = (self.precision.nanos() / NANOS_PER_MS).max(1);
        self.now_ms
            .checked_sub(self.now_ms.rem_euclid(unit))
            .unwrap_or(self.now_ms)
    }

    /// Marks every field that a later field with the same key replaces.
    fn mark_replaced_fields(&mut self) {
        if self.fields.len() < 2 {
            return;
        }
        let keys = &self.keys;
        let fields = &mut self.fields;
        let key = |f: &Field| &keys[f.key.0..f.key.1];
        self.order.clear();
        self.order.extend(0..fields.len());
        // Stable: equal keys stay in line order, so the last of each run is the one kept.
        self.order
            .sort_by(|&a, &b| key(&fields[a]).cmp(key(&fields[b])));
        for w in self.order.windows(2) {
            if key(&fields[w[0]]) == key(&fields[w[1]]) {
                fields[w[0]].replaced = true;
            }
        }
    }

    /// Adds the current line's fields as samples with `labels` at `timestamp_ms`.
    fn emit(&mut self, mut labels: Labels, timestamp_ms: i64) {
        let mut numeric = self
            .fields
            .iter()
            .filter(|f| !f.replaced && f.value.is_some())
            .count();
        for field in &self.fields {
            if field.replaced {
                continue;
            }
            let Some(value) = field.value else {
                self.parsed.skipped_fields += 1;
                continue;
            };
            let key = &self.keys[field.key.0..field.key.1];
            self.name.clear();
            self.name.push_str(&self.base);
            if key != "value" {
                self.name.push('_');
                push_sanitized(&mut self.name, key, true);
            }
            let families = &mut self.parsed.families;
            let family = match self.index.get(self.name.as_str()) {
                Some(&i) => i,
                None => {
                    let i = families.len();
                    families.push(Family::new(self.name.clone(), MetricType::Untyped, ""));
                    self.index.insert(self.name.clone(), i);
                    i
                }
            };
            numeric -= 1;
            let point_labels = if numeric == 0 {
                std::mem::take(&mut labels)
            } else {
                labels.clone()
            };
            families[family].push(point_labels, timestamp_ms, value);
            self.parsed.points += 1;
        }
    }
}

/// The number a field value stands for; a string value never gets here.
fn parse_value(token: &str) -> Result<f64, String> {
    let unsigned = token.trim_start_matches(['-', '+']);
    if ["nan", "inf", "infinity"]
        .iter()
        .any(|w| unsigned.eq_ignore_ascii_case(w))
    {
        return Err("NaN and infinity are not valid line protocol numbers".into());
    }
    match token.as_bytes().first() {
        Some(b'0'..=b'9' | b'-' | b'.') => parse_number(token),
        Some(b't' | b'T' | b'f' | b'F') => match token {
            "t" | "T" | "true" | "True" | "TRUE" => Ok(1.0),
            "f" | "F" | "false" | "False" | "FALSE" => Ok(0.0),
            _ => Err(format!("invalid boolean {}", quoted(token))),
        },
        Some(b'+') => Err(format!(
            "invalid number {} (a leading '+' is not allowed)",
            quoted(token)
        )),
        _ => Err(format!(
            "invalid value {} (strings must be in double quotes)",
            quoted(token)
        )),
    }
}

fn parse_number(token: &str) -> Result<f64, String> {
    if let Some(digits) = token.strip_suffix('i') {
        if !is_integer(digits, true) {
            return Err(format!("invalid integer {}", quoted(token)));
        }
        return digits
            .parse::<i64>()
            .map(|v| v as f64)
            .map_err(|_| format!("integer {} out of range", quoted(token)));
    }
    if let Some(digits) = token.strip_suffix('u') {
        if !is_integer(digits, false) {
            return Err(format!("invalid unsigned integer {}", quoted(token)));
        }
        return digits
            .parse::<u64>()
            .map(|v| v as f64)
            .map_err(|_| format!("unsigned integer {} out of range", quoted(token)));
    }
    if !is_float(token) {
        return Err(format!("invalid number {}", quoted(token)));
    }
    match token.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("number {} out of range", quoted(token))),
    }
}

/// `-?[0-9]+` (the minus only when `signed`).
fn is_integer(s: &str, signed: bool) -> bool {
    let digits = if signed {
        s.strip_prefix('-').unwrap_or(s)
    } else {
        s
    };
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
}

/// `-?(digits[.digits*] | .digits)([eE][+-]?digits)?`: the floats InfluxDB reads (Rust's
/// parser also takes `+1`, `inf` and `nan`, which InfluxDB refuses).
fn is_float(s: &str) -> bool {
    let b = s.as_bytes();
    let digits_from = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    let int_end = digits_from(i);
    let mut mantissa_digits = int_end - i;
    i = int_end;
    if b.get(i) == Some(&b'.') {
        let frac_end = digits_from(i + 1);
        mantissa_digits += frac_end - (i + 1);
        i = frac_end;
    }
    if mantissa_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_end = digits_from(i);
        if exp_end == i {
            return false;
        }
        i = exp_end;
    }
    i == b.len()
}

/// Appends `raw` to `out`, dropping each backslash that directly precedes one of `escapes`
/// (once: `\\,` is `\,`). Other backslashes are kept.
fn unescape_into(out: &mut String, raw: &str, escapes: &[u8]) {
    let b = raw.as_bytes();
    if !b.contains(&b'\\') {
        out.push_str(raw);
        return;
    }
    let mut copied = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\\' && escapes.contains(&b[i + 1]) {
            // Both cuts are next to ASCII bytes.
            out.push_str(&raw[copied..i]);
            copied = i + 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push_str(&raw[copied..]);
}

/// Appends `s` with each character outside `[a-zA-Z0-9_]` (and `:` when `colon`) as `_`.
fn push_sanitized(out: &mut String, s: &str, colon: bool) {
    for c in s.chars() {
        let keep = c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
        out.push(if keep { c } else { '_' });
    }
}

/// A tag key as a Prometheus label name (see the module doc).
fn label_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 1);
    if key.starts_with(|c: char| c.is_ascii_digit()) {
        name.push('_');
    }
    push_sanitized(&mut name, key, false);
    if name.starts_with("__") {
        let single = format!("_{}", name.trim_start_matches('_'));
        name = single;
    }
    name
}

/// At most `max` characters of `s`, with "…" when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// A name or value for an error message: clipped, in quotes, control characters escaped.
fn quoted(s: &str) -> String {
    format!("{:?}", clip(s, QUOTE_CHARS))
}

/// The start of a bad line for its error (invalid UTF-8 shown as U+FFFD).
fn excerpt(line: &[u8]) -> String {
    // 4 bytes per character at most, so this window holds the characters needed.
    let window = &line[..line.len().min(EXCERPT_CHARS * 4 + 4)];
    let text = String::from_utf8_lossy(window);
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if window.len() < line.len() => format!("{text}…"),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::influxdb::line_protocol::{Mapping, encode};
    use picket_core::model::{Histogram, Point, Summary, Value};

    const NOW: i64 = 1_700_000_123_456;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied())
    }

    fn run(body: &str, precision: Precision) -> Parsed {
        parse(body.as_bytes(), precision, NOW)
    }

    /// Parses `body` (ms precision), expecting no errors.
    fn ok(body: &str) -> Parsed {
        let parsed = run(body, Precision::Milliseconds);
        assert_eq!(parsed.errors, Vec::new(), "for {body:?}");
        parsed
    }

    /// Every sample as (name, labels, timestamp, value), in family then point order.
    fn samples(parsed: &Parsed) -> Vec<(String, Labels, i64, f64)> {
        let mut out = Vec::new();
        for family in &parsed.families {
            assert_eq!(family.kind, MetricType::Untyped);
            assert_eq!(family.help, "");
            for point in &family.points {
                let Value::Number(v) = point.value else {
                    panic!("not a number: {point:?}");
                };
                out.push((
                    family.name.clone(),
                    point.labels.clone(),
                    point.timestamp_ms,
                    v,
                ));
            }
        }
        out
    }

    /// The single sample of a one-line body.
    fn one(body: &str) -> (String, Labels, i64, f64) {
        let parsed = ok(body);
        let mut all = samples(&parsed);
        assert_eq!(all.len(), 1, "for {body:?}: {all:?}");
        all.remove(0)
    }

    fn name_of(body: &str) -> String {
        one(body).0
    }

    fn labels_of(body: &str) -> Labels {
        one(body).1
    }

    fn value_of(field: &str) -> f64 {
        one(&format!("m v={field} 1")).3
    }

    /// The reason a one-line body is refused.
    fn error_of(body: &str) -> String {
        let parsed = run(body, Precision::Milliseconds);
        assert_eq!(parsed.errors.len(), 1, "for {body:?}: {parsed:?}");
        assert_eq!(parsed.points, 0);
        parsed.errors[0].reason.clone()
    }

    #[test]
    fn precision_params() {
        let p = |s: Option<&str>| Precision::from_param(s);
        assert_eq!(p(None), Ok(Precision::Nanoseconds));
        for (param, want) in [
            ("", Precision::Nanoseconds),
            ("n", Precision::Nanoseconds),
            ("ns", Precision::Nanoseconds),
            ("u", Precision::Microseconds),
            ("us", Precision::Microseconds),
            ("µ", Precision::Microseconds),
            ("\u{3bc}", Precision::Microseconds),
            ("ms", Precision::Milliseconds),
            ("s", Precision::Seconds),
            ("m", Precision::Minutes),
            ("h", Precision::Hours),
        ] {
            assert_eq!(p(Some(param)), Ok(want), "{param:?}");
        }
        for bad in ["x", "S", "sec", "rfc3339", "mss", " s"] {
            let err = p(Some(bad)).unwrap_err();
            assert!(err.contains("invalid precision"), "{err}");
        }
    }

    #[test]
    fn measurement_escaping() {
        assert_eq!(name_of(r"my\ cpu\,x value=1"), "my_cpu_x");
        assert_eq!(name_of(r"my\ cpu,host=a value=1"), "my_cpu");
        // '=' and '"' are unescaped too (InfluxDB stores `a=b`), and need no escape.
        assert_eq!(name_of(r"a\=b value=1"), "a_b");
        assert_eq!(name_of(r#"a\"b value=1"#), "a_b");
        assert_eq!(name_of(r#"a=b"c value=1"#), "a_b_c");
        // A backslash before anything else is kept (and sanitised).
        assert_eq!(name_of(r"a\b value=1"), "a_b");
        assert_eq!(name_of(r"a\\b value=1"), "a__b");
        // `\\,` is a kept backslash and an escaped comma.
        assert_eq!(name_of(r"a\\,b value=1"), "a__b");
        // An escaped '#' is a measurement, not a comment; the backslash stays.
        assert_eq!(name_of(r"\#m value=1"), "__m");
        assert_eq!(name_of("m# value=1"), "m_");
        assert_eq!(name_of(r"\ m value=1"), "_m");
        assert_eq!(name_of("größe value=1"), "gr__e");
        assert_eq!(name_of("a:b value=1"), "a:b");
        assert_eq!(name_of("1m value=1"), "_1m");
    }

    #[test]
    fn tag_escaping() {
        let value = |raw: &str| {
            labels_of(&format!("m,k={raw} value=1"))
                .get("k")
                .map(str::to_owned)
        };
        assert_eq!(value(r"a\ b").as_deref(), Some("a b"));
        assert_eq!(value(r"a\,b").as_deref(), Some("a,b"));
        assert_eq!(value(r"a\=b").as_deref(), Some("a=b"));
        assert_eq!(value(r"\ lead").as_deref(), Some(" lead"));
        assert_eq!(value(r"trail\ ").as_deref(), Some("trail "));
        // Quotes, other backslashes and UTF-8 are literal.
        assert_eq!(value(r#""q""#).as_deref(), Some(r#""q""#));
        assert_eq!(value(r"C:\dir").as_deref(), Some(r"C:\dir"));
        assert_eq!(value(r"a\\b").as_deref(), Some(r"a\\b"));
        assert_eq!(value(r#"a\"b"#).as_deref(), Some(r#"a\"b"#));
        // A backslash before an escaped character is kept: `a\\,b` is `a\,b`.
        assert_eq!(value(r"a\\,b").as_deref(), Some(r"a\,b"));
        assert_eq!(value(r"a\\\,b").as_deref(), Some(r"a\\,b"));
        // How the encoder writes a trailing backslash; InfluxDB stores `C:\ `.
        assert_eq!(value(r"C:\\ ").as_deref(), Some(r"C:\ "));
        assert_eq!(
            value("Zürich\\ 東京\\ 😀").as_deref(),
            Some("Zürich 東京 😀")
        );
        assert_eq!(value("a\tb").as_deref(), Some("a\tb"));
        assert_eq!(value("#x").as_deref(), Some("#x"));

        // Tag keys: same escapes, then sanitised.
        assert_eq!(
            labels_of(r"m,my\ key=1,k\=x=2,k\,y=3 value=1"),
            labels(&[("my_key", "1"), ("k_x", "2"), ("k_y", "3")])
        );
        // Unsorted tags come out sorted.
        assert_eq!(
            labels_of("m,z=1,a=2 value=1"),
            labels(&[("a", "2"), ("z", "1")])
        );
    }

    #[test]
    fn field_key_escaping() {
        assert_eq!(name_of(r"m my\ field=1"), "m_my_field");
        assert_eq!(name_of(r"m a\,b=1"), "m_a_b");
        assert_eq!(name_of(r"m a\=b=1"), "m_a_b");
        assert_eq!(name_of(r#"m a\"b=1"#), "m_a_b");
        assert_eq!(name_of(r#"m "q"=1"#), "m__q_");
        assert_eq!(name_of(r"m a\b=1"), "m_a_b");
        assert_eq!(name_of("m val:ue=1"), "m_val:ue");
        assert_eq!(name_of("m Value=1"), "m_Value");
        assert_eq!(name_of("m value=1"), "m");
        // A backslash before an ordinary character stays.
        assert_eq!(name_of(r"m valu\e=1"), "m_valu_e");
    }

    #[test]
    fn float_values() {
        assert_eq!(value_of("1"), 1.0);
        assert_eq!(value_of("1.5"), 1.5);
        assert_eq!(value_of("-1e3"), -1000.0);
        assert_eq!(value_of("1E+3"), 1000.0);
        assert_eq!(value_of("25e-1"), 2.5);
        assert_eq!(value_of(".5"), 0.5);
        assert_eq!(value_of("-.5"), -0.5);
        assert_eq!(value_of("1."), 1.0);
        assert_eq!(value_of("007"), 7.0);
        assert_eq!(value_of("-0"), 0.0);
        assert_eq!(value_of("1e-400"), 0.0);
        assert_eq!(value_of("0.1"), 0.1);
        assert_eq!(value_of("1.7976931348623157e308"), f64::MAX);
        // influxdb-java writes doubles without exponent, with up to 340 decimals.
        assert_eq!(value_of("100000000000000000000"), 1e20);
        assert_eq!(value_of("0.0000000001"), 1e-10);

        for bad in [
            "+1", "1.2.3", "1e", "1e+", "e5", ".", "-", "-.", "0x10", "1_000", "1e5.0", "--1",
            "1-", "١",
        ] {
            let err = error_of(&format!("m v={bad} 1"));
            assert!(err.starts_with("field \"v\": "), "{bad}: {err}");
        }
        assert!(error_of("m v=+1").contains("leading '+'"));
        assert!(error_of("m v=1e400").contains("out of range"));
        assert!(error_of("m v=-1e400").contains("out of range"));
        assert!(error_of("m v=abc").contains("double quotes"));
    }

    #[test]
    fn nan_and_infinity_refused() {
        for bad in [
            "NaN",
            "nan",
            "-NaN",
            "Inf",
            "inf",
            "-Inf",
            "+Inf",
            "Infinity",
            "-infinity",
        ] {
            let err = error_of(&format!("m v={bad} 1"));
            assert!(err.contains("NaN and infinity"), "{bad}: {err}");
        }
        // Other fields of the line do not save it.
        assert!(error_of("m a=1,v=NaN,b=2 1").contains("NaN"));
    }

    #[test]
    fn integer_values() {
        assert_eq!(value_of("12i"), 12.0);
        assert_eq!(value_of("-12i"), -12.0);
        assert_eq!(value_of("0i"), 0.0);
        assert_eq!(value_of("-0i"), 0.0);
        assert_eq!(value_of("9223372036854775807i"), i64::MAX as f64);
        assert_eq!(value_of("-9223372036854775808i"), i64::MIN as f64);
        assert_eq!(value_of("12u"), 12.0);
        assert_eq!(value_of("0u"), 0.0);
        assert_eq!(value_of("18446744073709551615u"), u64::MAX as f64);

        assert!(error_of("m v=9223372036854775808i").contains("out of range"));
        assert!(error_of("m v=-9223372036854775809i").contains("out of range"));
        assert!(error_of("m v=18446744073709551616u").contains("out of range"));
        for bad in [
            "1.5i", "1e3i", "i", "-i", "+1i", "1ii", "1iu", "-1u", "1.0u", "u", "1i5", "1u5",
        ] {
            let err = error_of(&format!("m v={bad} 1"));
            assert!(err.starts_with("field \"v\": "), "{bad}: {err}");
        }
    }

    #[test]
    fn boolean_values() {
        for t in ["t", "T", "true", "True", "TRUE"] {
            assert_eq!(value_of(t), 1.0, "{t}");
        }
        for f in ["f", "F", "false", "False", "FALSE"] {
            assert_eq!(value_of(f), 0.0, "{f}");
        }
        for bad in ["tRUE", "tru", "FALSe", "trueX", "fa"] {
            assert!(
                error_of(&format!("m v={bad}")).contains("invalid boolean"),
                "{bad}"
            );
        }
    }

    #[test]
    fn string_values_are_skipped() {
        let parsed = ok(concat!(
            r#"m s="plain",a=1,e="",q="say \"hi\", x=y z",b="back\\",c=2 5"#,
            "\n",
            r#"m s="a,b c=d"  7"#,
            "\n",
        ));
        assert_eq!(parsed.points, 2);
        assert_eq!(parsed.skipped_fields, 5);
        assert_eq!(
            samples(&parsed),
            vec![
                ("m_a".into(), Labels::new(), 5, 1.0),
                ("m_c".into(), Labels::new(), 5, 2.0),
            ]
        );
        // A line of strings only: nothing, and no error.
        assert!(parsed.families.iter().all(|f| f.name != "m_s"));

        assert!(error_of(r#"m s="open 1"#).contains("unterminated string"));
        assert!(error_of(r#"m s="esc\" 1"#).contains("unterminated string"));
        assert!(error_of(r#"m s="x"y 1"#).contains("after the closing quote"));
        assert!(error_of(r#"m s="x""y" 1"#).contains("after the closing quote"));
        // Quotes only open strings at the start of a value.
        assert!(error_of(r#"m s=x"y" 1"#).contains("invalid value"));
    }

    #[test]
    fn newlines_inside_strings_continue_the_line() {
        let body = "m,k=v s=\"line one\nline two, a=1\",v=1 5\r\nbad\nnext value=2 6\n";
        let parsed = run(body, Precision::Milliseconds);
        assert_eq!(
            samples(&parsed),
            vec![
                ("m_v".into(), labels(&[("k", "v")]), 5, 1.0),
                ("next".into(), Labels::new(), 6, 2.0),
            ]
        );
        assert_eq!(parsed.skipped_fields, 1);
        // `bad` is on physical line 3.
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].line, 3);
        assert_eq!(parsed.errors[0].excerpt, "bad");

        // A string that never closes: the line ends at its newline; the rest is parsed.
        let body = "a value=1 1\nm s=\"open\nok value=2 2\nalso value=3 3";
        let parsed = run(body, Precision::Milliseconds);
        assert_eq!(parsed.points, 3);
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].line, 2);
        assert_eq!(parsed.errors[0].excerpt, "m s=\"open");
        assert!(parsed.errors[0].reason.contains("unterminated"));
        // ... also when an earlier string did close across lines.
        let body = "m s=\"x\ny\",t=\"open\nok value=2 2\n";
        let parsed = run(body, Precision::Milliseconds);
        assert_eq!(parsed.points, 1);
        assert_eq!(parsed.errors.len(), 2, "{parsed:?}");

        // Quotes in the measurement or tags do not open strings.
        let parsed = ok("m,k=\"a value=1 1\nn,k=b\" value=2 2\n");
        assert_eq!(parsed.points, 2);
        // Nor in comments.
        let parsed = ok("# s=\"x\nm value=1 1\n");
        assert_eq!(parsed.points, 1);
    }

    #[test]
    fn precisions_and_negative_timestamps() {
        let at = |precision: Precision, ts: &str| -> Result<i64, String> {
            let parsed = run(&format!("m value=1 {ts}"), precision);
            match (parsed.errors.first(), samples(&parsed).first()) {
                (Some(e), _) => Err(e.reason.clone()),
                (None, Some(s)) => Ok(s.2),
                (None, None) => Err("nothing".into()),
            }
        };
        use Precision::*;
        assert_eq!(
            at(Nanoseconds, "1700000000123456789"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(at(Nanoseconds, "999999"), Ok(0));
        assert_eq!(at(Nanoseconds, "-1"), Ok(-1));
        assert_eq!(at(Nanoseconds, "-999999"), Ok(-1));
        assert_eq!(at(Nanoseconds, "-1000000"), Ok(-1));
        assert_eq!(at(Nanoseconds, "-1000001"), Ok(-2));
        assert_eq!(at(Microseconds, "1500"), Ok(1));
        assert_eq!(at(Microseconds, "-1"), Ok(-1));
        assert_eq!(at(Microseconds, "-1000"), Ok(-1));
        assert_eq!(at(Microseconds, "-1001"), Ok(-2));
        assert_eq!(at(Milliseconds, "1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(at(Milliseconds, "-5"), Ok(-5));
        assert_eq!(at(Milliseconds, "0"), Ok(0));
        assert_eq!(at(Milliseconds, "-0"), Ok(0));
        assert_eq!(at(Seconds, "1700000000"), Ok(1_700_000_000_000));
        assert_eq!(at(Seconds, "-1"), Ok(-1000));
        assert_eq!(at(Minutes, "2"), Ok(120_000));
        assert_eq!(at(Minutes, "-1"), Ok(-60_000));
        assert_eq!(at(Hours, "1"), Ok(3_600_000));
        assert_eq!(at(Hours, "-1"), Ok(-3_600_000));

        // InfluxDB's range: nanoseconds in [i64::MIN + 2, i64::MAX - 1].
        assert_eq!(
            at(Nanoseconds, "9223372036854775806"),
            Ok(9_223_372_036_854)
        );
        assert_eq!(
            at(Nanoseconds, "-9223372036854775806"),
            Ok(-9_223_372_036_855)
        );
        assert_eq!(
            at(Microseconds, "-9223372036854775"),
            Ok(-9_223_372_036_855)
        );
        assert_eq!(at(Seconds, "9223372036"), Ok(9_223_372_036_000));
        assert_eq!(at(Hours, "2562047"), Ok(2_562_047 * 3_600_000));
        for (precision, ts) in [
            (Nanoseconds, "9223372036854775807"),
            (Nanoseconds, "-9223372036854775807"),
            (Nanoseconds, "-9223372036854775808"),
            (Nanoseconds, "9223372036854775808"),
            (Nanoseconds, "99999999999999999999999"),
            (Microseconds, "9223372036854776"),
            (Milliseconds, "9223372036855"),
            (Milliseconds, "-9223372036855"),
            (Seconds, "9223372037"),
            (Seconds, "-9223372037"),
            (Minutes, "153722868"),
            (Hours, "2562048"),
            (Hours, "-9223372036854775808"),
        ] {
            let err = at(precision, ts).unwrap_err();
            assert!(err.contains("out of range"), "{precision:?} {ts}: {err}");
        }
        for bad in ["12a", "+12", "1.5", "1e9", "-", "--1", "0x1", "1_0"] {
            let err = at(Milliseconds, bad).unwrap_err();
            assert!(err.contains("invalid timestamp"), "{bad}: {err}");
        }
    }

    #[test]
    fn missing_timestamp_is_now_cut_to_the_precision() {
        let at = |precision| samples(&run("m value=1", precision))[0].2;
        assert_eq!(at(Precision::Nanoseconds), NOW);
        assert_eq!(at(Precision::Microseconds), NOW);
        assert_eq!(at(Precision::Milliseconds), NOW);
        assert_eq!(at(Precision::Seconds), 1_700_000_123_000);
        assert_eq!(at(Precision::Minutes), 1_700_000_100_000);
        assert_eq!(at(Precision::Hours), 1_699_999_200_000);
        // Before 1970 the cut is down too.
        let parsed = parse(b"m value=1", Precision::Seconds, -1);
        assert_eq!(samples(&parsed)[0].2, -1000);
        let parsed = parse(b"m value=1", Precision::Hours, i64::MIN);
        assert_eq!(samples(&parsed)[0].2, i64::MIN);
    }

    #[test]
    fn whitespace_comments_blank_lines_and_crlf() {
        let body = "# a comment\n\
                    \x20  # an indented one, with m value=9\n\
                    #m value=9 9\n\
                    \n\
                    \x20 \t \n\
                    \r\n\
                    a value=1 1\r\n\
                    \x20 \tb value=2 2\n\
                    c  \t value=3   3  \t\n\
                    d value=4 \t 4\n\
                    e value=5   \n\
                    f,k=v value=6 6";
        let parsed = ok(body);
        let got: Vec<(String, i64, f64)> = samples(&parsed)
            .into_iter()
            .map(|(n, _, t, v)| (n, t, v))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 1, 1.0),
                ("b".into(), 2, 2.0),
                ("c".into(), 3, 3.0),
                ("d".into(), 4, 4.0),
                ("e".into(), NOW, 5.0),
                ("f".into(), 6, 6.0),
            ]
        );
        assert_eq!(parse(b"", Precision::Nanoseconds, NOW).families.len(), 0);
        assert_eq!(ok("\n\n\r\n").points, 0);

        // A tab is not a separator between measurement and fields, nor between a value and
        // the timestamp.
        assert_eq!(error_of("m\tvalue=1"), "missing fields");
        assert!(error_of("m value=1\t5").contains("invalid number"));
        // Nor is a space allowed between fields.
        assert!(error_of("m a=1, b=2").contains("missing field key"));
        assert!(error_of("m a=1 b=2").contains("invalid timestamp"));
    }

    #[test]
    fn a_line_that_would_expand_without_bound_is_an_error() {
        let tags: String = (0..100)
            .map(|i| format!(",tag{i}={}", "v".repeat(40)))
            .collect();
        let fields: Vec<String> = (0..1000).map(|i| format!("f{i}=1")).collect();
        let body = format!("bomb{tags} {}\nok,host=a value=1\n", fields.join(","));
        let parsed = parse(body.as_bytes(), Precision::Milliseconds, 5);
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].line, 1);
        assert!(
            parsed.errors[0].reason.contains("split the line"),
            "{:?}",
            parsed.errors
        );
        assert_eq!(parsed.points, 1);
    }

    /// Found with the `influx_line` fuzz target's binary on long lines: each tag is inserted
    /// into a sorted label set, so a line's tags took quadratic time (about 20 s for one
    /// 1.8 MB line of 200,000 tags; a 32 MB body would have kept the receiver busy for hours).
    #[test]
    fn a_line_has_at_most_max_labels_per_series_tags() {
        let line = |n: usize| {
            let tags: Vec<String> = (0..n).map(|i| format!("t{i}=v")).collect();
            format!("m,{} value=1 1\nok value=2 2\n", tags.join(","))
        };
        let parsed = run(&line(MAX_LABELS_PER_SERIES), Precision::Nanoseconds);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(
            parsed.families[0].points[0].labels.len(),
            MAX_LABELS_PER_SERIES
        );
        for n in [MAX_LABELS_PER_SERIES + 1, 20_000] {
            let parsed = run(&line(n), Precision::Nanoseconds);
            assert_eq!(parsed.errors.len(), 1, "{n} tags");
            assert_eq!(parsed.errors[0].line, 1);
            assert!(
                parsed.errors[0].reason.contains("more than 128 tags"),
                "{:?}",
                parsed.errors[0]
            );
            // The next line is still read.
            assert_eq!(parsed.points, 1);
        }
    }

    #[test]
    fn line_errors() {
        let cases = [
            ("m", "missing fields"),
            ("m ", "missing fields"),
            ("m,k=v", "missing fields"),
            ("m,k=v ", "missing fields"),
            (",k=v value=1", "missing measurement"),
            ("m,k value=1", "tag \"k\" has no '='"),
            ("m,k", "tag \"k\" has no '='"),
            ("m,k=v,j value=1", "tag \"j\" has no '='"),
            ("m,k=v, value=1", "tag \"\" has no '='"),
            ("m,k=a=b value=1", "unescaped '=' in the value of tag \"k\""),
            ("m,k== value=1", "unescaped '=' in the value of tag \"k\""),
            ("m value", "field \"value\" has no '='"),
            ("m a=1,b", "field \"b\" has no '='"),
            ("m a=1,b 5", "field \"b\" has no '='"),
            ("m =1", "missing field key"),
            ("m a=1,=2", "missing field key"),
            ("m a=1,", "missing field key"),
            ("m a=", "field \"a\" has no value"),
            ("m a= 1", "field \"a\" has no value"),
            ("m a=,b=1", "field \"a\" has no value"),
            ("m value=1 1 2", "unexpected text after the timestamp"),
            ("m value=1 1x", "invalid timestamp \"1x\""),
            (r"m\ value=1", "missing fields"),
        ];
        for (line, reason) in cases {
            assert_eq!(error_of(line), reason, "{line:?}");
        }
    }

    #[test]
    fn errors_keep_the_other_lines() {
        let mut body = b"ok value=1 1\nm v=NaN 2\n\nok value=3 3\r\nm,k=a=b v=1\n".to_vec();
        body.extend_from_slice(b"bad\xff\xfe value=1\n");
        body.extend_from_slice(b"  m v=1x \nok value=4 4");
        let parsed = parse(&body, Precision::Milliseconds, NOW);
        assert_eq!(parsed.points, 3);
        assert_eq!(
            samples(&parsed)
                .iter()
                .map(|s| (s.2, s.3))
                .collect::<Vec<_>>(),
            vec![(1, 1.0), (3, 3.0), (4, 4.0)]
        );
        let errors: Vec<(usize, &str)> = parsed
            .errors
            .iter()
            .map(|e| (e.line, e.excerpt.as_str()))
            .collect();
        assert_eq!(
            errors,
            vec![
                (2, "m v=NaN 2"),
                (5, "m,k=a=b v=1"),
                (6, "bad\u{fffd}\u{fffd} value=1"),
                (7, "m v=1x "),
            ]
        );
        assert_eq!(parsed.errors[2].reason, "invalid UTF-8");
        assert!(parsed.errors[3].reason.contains("\"1x\""));
    }

    #[test]
    fn excerpts_are_short_and_char_safe() {
        let long = format!("m,k={} value=x", "é".repeat(300));
        let parsed = run(&long, Precision::Milliseconds);
        let excerpt = &parsed.errors[0].excerpt;
        assert_eq!(excerpt.chars().count(), EXCERPT_CHARS + 1);
        assert!(excerpt.starts_with("m,k=éé") && excerpt.ends_with("é…"));

        let long = format!("m value={}", "9".repeat(10_000) + "x");
        let parsed = run(&long, Precision::Milliseconds);
        assert_eq!(parsed.errors[0].excerpt.chars().count(), EXCERPT_CHARS + 1);
        // Reasons quote at most QUOTE_CHARS of a token.
        assert!(
            parsed.errors[0].reason.len() < 100,
            "{:?}",
            parsed.errors[0]
        );

        let mut bytes = "😀".repeat(200).into_bytes();
        bytes.truncate(401);
        let parsed = parse(&bytes, Precision::Milliseconds, NOW);
        assert_eq!(parsed.errors[0].excerpt.chars().count(), EXCERPT_CHARS + 1);
    }

    #[test]
    fn duplicate_field_keys_last_wins() {
        let parsed = ok("m a=1,b=2,a=3 1");
        assert_eq!(
            samples(&parsed),
            vec![
                ("m_b".into(), Labels::new(), 1, 2.0),
                ("m_a".into(), Labels::new(), 1, 3.0),
            ]
        );
        // The last one decides whether the field is a sample or a skipped string.
        let parsed = ok("m a=\"x\",a=1 1");
        assert_eq!((parsed.points, parsed.skipped_fields), (1, 0));
        let parsed = ok("m a=1,a=\"x\" 1");
        assert_eq!((parsed.points, parsed.skipped_fields), (0, 1));
        assert!(parsed.families.is_empty());
        // Escaped and plain spellings of one key are one key.
        let parsed = ok(r"m a\ b=1,a\ b=2 1");
        assert_eq!(samples(&parsed)[0].3, 2.0);
        assert_eq!(parsed.points, 1);
        // Different keys giving one name are both kept, in order.
        let parsed = ok("m a-b=1,a_b=2 1");
        assert_eq!(
            samples(&parsed)
                .iter()
                .map(|s| (s.0.as_str(), s.3))
                .collect::<Vec<_>>(),
            vec![("m_a_b", 1.0), ("m_a_b", 2.0)]
        );
        // Many fields, with repeats.
        let mut line = String::from("m ");
        for i in 0..200 {
            line.push_str(&format!("f{}={i},", i % 50));
        }
        line.pop();
        let parsed = ok(&line);
        assert_eq!(parsed.points, 50);
        let all = samples(&parsed);
        assert_eq!(all[0], ("m_f0".into(), Labels::new(), NOW, 150.0));
        assert_eq!(all[49], ("m_f49".into(), Labels::new(), NOW, 199.0));
    }

    #[test]
    fn sanitising_names_and_labels() {
        assert_eq!(
            one("cpu.load-1m,host.name=a,1st=b,__name__=c,k:x=d,Zürich=e,_ok=f value=1"),
            (
                "cpu_load_1m".into(),
                labels(&[
                    ("host_name", "a"),
                    ("_1st", "b"),
                    ("_name__", "c"),
                    ("k_x", "d"),
                    ("Z_rich", "e"),
                    ("_ok", "f"),
                ]),
                NOW,
                1.0
            )
        );
        assert_eq!(labels_of("m,___=x value=1"), labels(&[("_", "x")]));
        assert_eq!(labels_of("m,-x=1 value=1"), labels(&[("_x", "1")]));
        assert_eq!(labels_of("m,--x=1 value=1"), labels(&[("_x", "1")]));
        assert_eq!(name_of("9lives value=1"), "_9lives");
        assert_eq!(name_of("9lives f-1=1"), "_9lives_f_1");
        assert_eq!(name_of("m 9=1"), "m_9");
        assert_eq!(name_of("__m value=1"), "__m");
        for body in [
            "cpu.load,host.name=a value=1",
            "m,1st=b value=1",
            "m,__name__=c value=1",
        ] {
            let (name, labels, _, _) = one(body);
            assert!(picket_core::model::is_valid_metric_name(&name));
            assert!(
                labels.iter().all(
                    |(n, _)| picket_core::model::is_valid_label_name(n) && !n.starts_with("__")
                )
            );
        }

        // Empty keys and values are left out.
        assert_eq!(labels_of("m,k=,=v,j=1,e= value=1"), labels(&[("j", "1")]));
        // Two tags, one label: refused.
        assert!(error_of("m,a-b=1,a.b=2 value=1").contains("two tags give label \"a_b\""));
        assert!(error_of("m,k=1,k=2 value=1").contains("\"k\""));
        assert!(error_of("m,__x=1,_x=2 value=1").contains("\"_x\""));
    }

    #[test]
    fn same_series_and_families_in_first_seen_order() {
        let parsed = ok("b,k=v value=1 5\na value=1 1\nb,k=v value=2 5\nb,k=w value=3 5\n");
        let names: Vec<&str> = parsed.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        let b: Vec<(Labels, i64, f64)> = parsed.families[0]
            .points
            .iter()
            .map(|p| {
                let Value::Number(v) = p.value else {
                    unreachable!()
                };
                (p.labels.clone(), p.timestamp_ms, v)
            })
            .collect();
        assert_eq!(
            b,
            vec![
                (labels(&[("k", "v")]), 5, 1.0),
                (labels(&[("k", "v")]), 5, 2.0),
                (labels(&[("k", "w")]), 5, 3.0),
            ]
        );
        assert_eq!(parsed.points, 4);
    }

    /// Lines as Flink's InfluxdbReporter writes them through influxdb-java (`precision=n`).
    #[test]
    fn flink_reporter_lines() {
        let tags = r"host=tm-1,job_name=etl\ job,operator_name=Source:\ datagen,subtask_index=0,task_attempt_id=abc";
        let ts = "1700000000000000000";
        let body = format!(
            "taskmanager_job_task_operator_numRecordsIn,{tags} count=123i {ts}\n\
             taskmanager_job_task_operator_currentInputWatermark,{tags} value=1699999999000i {ts}\n\
             taskmanager_Status_JVM_CPU_Load,host=tm-1,tm_id=container_01 value=0.0123 {ts}\n\
             taskmanager_job_task_operator_numRecordsInPerSecond,{tags} count=500i,rate=8.333333333333334 {ts}\n\
             taskmanager_job_task_operator_latency,{tags} count=100i,min=1i,max=12i,mean=3.5,stddev=1.25,p50=3.0,p75=4.0,p95=8.0,p98=10.0,p99=11.0,p999=12.0 {ts}\n\
             jobmanager_job_checkpointPath,job_name=etl\\ job value=\"s3://bucket/chk-1\" {ts}\n\
             jobmanager_job_isBackPressured,job_name=etl\\ job value=false {ts}\n"
        );
        let parsed = parse(body.as_bytes(), Precision::Nanoseconds, NOW);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.skipped_fields, 1);
        let task = labels(&[
            ("host", "tm-1"),
            ("job_name", "etl job"),
            ("operator_name", "Source: datagen"),
            ("subtask_index", "0"),
            ("task_attempt_id", "abc"),
        ]);
        let at = 1_700_000_000_000;
        let op = "taskmanager_job_task_operator";
        let mut want: Vec<(String, Labels, i64, f64)> = vec![
            (format!("{op}_numRecordsIn_count"), task.clone(), at, 123.0),
            (
                format!("{op}_currentInputWatermark"),
                task.clone(),
                at,
                1_699_999_999_000.0,
            ),
            (
                "taskmanager_Status_JVM_CPU_Load".into(),
                labels(&[("host", "tm-1"), ("tm_id", "container_01")]),
                at,
                0.0123,
            ),
            (
                format!("{op}_numRecordsInPerSecond_count"),
                task.clone(),
                at,
                500.0,
            ),
            (
                format!("{op}_numRecordsInPerSecond_rate"),
                task.clone(),
                at,
                8.333333333333334,
            ),
        ];
        for (field, v) in [
            ("count", 100.0),
            ("min", 1.0),
            ("max", 12.0),
            ("mean", 3.5),
            ("stddev", 1.25),
            ("p50", 3.0),
            ("p75", 4.0),
            ("p95", 8.0),
            ("p98", 10.0),
            ("p99", 11.0),
            ("p999", 12.0),
        ] {
            want.push((format!("{op}_latency_{field}"), task.clone(), at, v));
        }
        want.push((
            "jobmanager_job_isBackPressured".into(),
            labels(&[("job_name", "etl job")]),
            at,
            0.0,
        ));
        assert_eq!(samples(&parsed), want);
        assert_eq!(parsed.points, want.len());
        assert_eq!(parsed.families.len(), want.len());
    }

    #[test]
    fn hundred_thousand_lines() {
        const LINES: usize = 100_000;
        let mut body = String::with_capacity(LINES * 200);
        for i in 0..LINES {
            let subtask = i % 1000;
            match i % 4 {
                0 => body.push_str(&format!(
                    "taskmanager_job_task_operator_numRecordsIn,host=tm-{},job_name=etl\\ job,operator_name=Source:\\ datagen,subtask_index={subtask},task_attempt_id=a{subtask} count={i}i {}\n",
                    subtask % 10,
                    1_700_000_000_000_000_000i64 + (i / 1000) as i64 * 1_000_000_000
                )),
                1 => body.push_str(&format!(
                    "taskmanager_Status_JVM_CPU_Load,host=tm-{},tm_id=c{subtask} value=0.{i} {}\n",
                    subtask % 10,
                    1_700_000_000_000_000_000i64 + (i / 1000) as i64 * 1_000_000_000
                )),
                2 => body.push_str(&format!(
                    "taskmanager_job_task_operator_numRecordsInPerSecond,host=tm-1,subtask_index={subtask} count={i}i,rate={i}.5 1700000000000000000\n"
                )),
                _ => body.push_str(&format!(
                    "taskmanager_job_task_operator_latency,host=tm-1,subtask_index={subtask} count=100i,min=1i,max=12i,mean=3.5,stddev=1.25,p50=3.0,p75=4.0,p95=8.0,p98=10.0,p99=11.0,p999=12.0,state=\"RUNNING\" 1700000000000000000\n"
                )),
            }
        }
        let started = std::time::Instant::now();
        let parsed = parse(body.as_bytes(), Precision::Nanoseconds, NOW);
        let elapsed = started.elapsed();
        eprintln!(
            "parsed {LINES} lines ({} bytes, {} points) in {elapsed:?}",
            body.len(),
            parsed.points
        );
        assert!(parsed.errors.is_empty(), "{:?}", &parsed.errors[..1]);
        let quarter = LINES / 4;
        assert_eq!(parsed.points, quarter * (1 + 1 + 2 + 11));
        assert_eq!(parsed.skipped_fields, quarter);
        assert_eq!(parsed.families.len(), 1 + 1 + 2 + 11);
        let first = &parsed.families[0];
        assert_eq!(
            first.name,
            "taskmanager_job_task_operator_numRecordsIn_count"
        );
        assert_eq!(first.points.len(), quarter);
        let last = &first.points[quarter - 1];
        assert_eq!(last.value, Value::Number((LINES - 4) as f64));
        assert_eq!(last.timestamp_ms, 1_700_000_000_000 + 99_000);
        assert_eq!(last.labels.get("job_name"), Some("etl job"));
        assert_eq!(last.labels.get("subtask_index"), Some("996"));
    }

    /// What our InfluxDB sink writes reads back the same.
    #[test]
    fn round_trip_with_the_encoder() {
        let hostile = [
            "a b",
            "a,b",
            "a=b",
            " lead",
            "trail ",
            " ",
            ",",
            "=",
            "\"quoted\"",
            "\"",
            r"back\slash",
            r"a\,b",
            r"a\ b",
            r"a\=b",
            r"a\\,b",
            r"\x",
            r#"a\"b"#,
            "a\tb",
            "#hash",
            "Zürich 東京 😀",
            "ünï cödé, with = and \\ all",
        ];
        let values = [
            0.1,
            1.0 / 3.0,
            -42.0,
            1e300,
            -1e-310,
            5e-324,
            f64::MAX,
            123_456_789_012_345.0,
            2.5e-7,
        ];
        let mut families = Vec::new();
        for (i, v) in hostile.iter().enumerate() {
            let mut f = Family::new("flink_gauge", MetricType::Gauge, "help");
            f.push(
                labels(&[("k", v), ("job", "etl"), ("k2", v)]),
                -1000 + i as i64,
                values[i % values.len()],
            );
            families.push(f);
        }
        let mut summary = Family::new("lat", MetricType::Summary, "");
        summary.points.push(Point {
            labels: labels(&[("k", "x y")]),
            timestamp_ms: 7,
            value: Value::Summary(Summary {
                count: u64::MAX,
                sum: 2.5,
                quantiles: vec![(0.5, 1.0)],
            }),
        });
        families.push(summary);
        let mut histogram = Family::new("req", MetricType::Histogram, "");
        histogram.points.push(Point {
            labels: Labels::new(),
            timestamp_ms: 8,
            value: Value::Histogram(Histogram {
                count: 4,
                sum: 7.5,
                buckets: vec![(0.5, 1)],
            }),
        });
        families.push(histogram);

        let mut out = Vec::new();
        let stats = encode(&families, &Mapping::Family, &mut out);
        let parsed = parse(&out, Precision::Milliseconds, NOW);
        assert!(
            parsed.errors.is_empty(),
            "{:?}\n{}",
            parsed.errors,
            String::from_utf8_lossy(&out)
        );
        assert_eq!(parsed.points, stats.samples);
        let got = samples(&parsed);
        let gauges: Vec<_> = got.iter().filter(|s| s.0 == "flink_gauge").collect();
        assert_eq!(gauges.len(), hostile.len());
        for (i, (v, sample)) in hostile.iter().zip(gauges).enumerate() {
            let want = labels(&[("k", v), ("job", "etl"), ("k2", v)]);
            assert_eq!(sample.1, want, "{v:?}");
            assert_eq!(sample.2, -1000 + i as i64);
            assert_eq!(sample.3.to_bits(), values[i % values.len()].to_bits());
        }
        let find = |name: &str, extra: Option<(&str, &str)>| {
            got.iter()
                .find(|s| s.0 == name && extra.is_none_or(|(k, v)| s.1.get(k) == Some(v)))
                .map(|s| s.3)
        };
        assert_eq!(find("lat_count", None), Some(u64::MAX as f64));
        assert_eq!(find("lat_sum", None), Some(2.5));
        assert_eq!(find("lat", Some(("quantile", "0.5"))), Some(1.0));
        assert_eq!(find("req_bucket", Some(("le", "0.5"))), Some(1.0));
        assert_eq!(find("req_bucket", Some(("le", "+Inf"))), Some(4.0));

        // Grouped: one measurement, metric names as field keys.
        let mut out = Vec::new();
        encode(
            &families[..3],
            &Mapping::Grouped {
                measurement: "flink metrics, prod".into(),
            },
            &mut out,
        );
        let parsed = parse(&out, Precision::Milliseconds, NOW);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let got = samples(&parsed);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|s| s.0 == "flink_metrics__prod_flink_gauge"));
        assert_eq!(got[1].1.get("k"), Some("a,b"));

        // The encoder's documented lossy case reads back as InfluxDB stores it.
        let mut f = Family::new("g", MetricType::Gauge, "");
        f.push(labels(&[("path", r"C:\")]), 1, 1.0);
        let mut out = Vec::new();
        encode(&[f], &Mapping::Family, &mut out);
        assert_eq!(
            labels_of(&String::from_utf8_lossy(&out)).get("path"),
            Some(r"C:\ ")
        );
    }
}
