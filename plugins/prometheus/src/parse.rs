//! Prometheus text exposition (0.0.4) and OpenMetrics 1.0.0 → Picket metric families.
//!
//! One parser reads both formats; [`Format`] switches the few places where they differ: the
//! timestamp unit (milliseconds in text, seconds with a fraction in OpenMetrics, converted to
//! milliseconds here), the `# EOF` terminator, and the OpenMetrics-only sample suffixes.
//!
//! # What comes out
//!
//! - Counters, gauges and untyped samples: one number sample per line, in a family named after
//!   the *exposed sample name*. An OpenMetrics counter `# TYPE foo counter` with samples
//!   `foo_total` therefore becomes the family `foo_total`, the name Prometheus stores.
//! - Summaries: `foo{quantile=".."}`, `foo_sum` and `foo_count` of one label set become one
//!   [`Summary`] value. A missing `foo_sum` becomes NaN (Flink's reporter never writes one).
//! - Histograms: `foo_bucket{le=".."}`, `foo_sum` and `foo_count` of one label set become one
//!   [`Histogram`] value, buckets sorted by bound. A missing `foo_count` is taken from the
//!   `+Inf` bucket, a missing `+Inf` bucket from `foo_count` (it is the count by definition);
//!   a missing `foo_sum` becomes NaN.
//! - OpenMetrics `foo_created` samples (counters, summaries, histograms) are dropped: they are
//!   metadata about the series (when it was reset), not a measurement, and Picket's model has
//!   no place for them. In text 0.0.4 a `foo_created` line is an ordinary series.
//! - OpenMetrics gauge histograms become three gauge families, `foo_bucket` (with its `le`
//!   label), `foo_gcount` and `foo_gsum`, which is what Prometheus stores: their buckets go up
//!   and down, so the cumulative histogram kind would make `rate()` lie.
//! - OpenMetrics `info` (`foo_info`) and `stateset` families become gauges; `unknown` is
//!   untyped. Exemplars are ignored, and so is `# UNIT`.
//!
//! # Leniency
//!
//! Both formats accept blank lines, CRLF line ends, runs of spaces or tabs between tokens,
//! whitespace around `=` and `,` in label lists, and a trailing comma before `}` (Apache Flink
//! writes `{a="1",}`). Label values unescape `\\`, `\"` and `\n`; any other backslash pair is
//! kept as written, as Prometheus does. Families may be interleaved.
//!
//! # Errors: one bad line fails the whole exposition
//!
//! A line that cannot be read makes [`parse`] return a [`ParseError`] naming the line number,
//! what is wrong and the line itself. That is what Prometheus does (a scrape with one bad line
//! is a failed scrape), and it is the safe choice: a half-read exposition would silently lose
//! series. Also fatal: a body that is not UTF-8, a label name appearing twice in one sample,
//! more than [`MAX_LABELS`] labels on one sample, an unknown or contradictory `# TYPE`, a `# TYPE` after samples of its own family, and in
//! OpenMetrics a missing `# EOF` (usually a truncated body) or content after it.
//!
//! Series that parse but that Picket's model cannot hold are not fatal: a histogram whose
//! bucket counts decrease or exceed its count, a summary quantile outside [0, 1], a summary
//! without `_count`, a negative count, and so on. They are left out and listed in
//! [`Parsed::invalid`] so the caller can count and log them. Leaving them in is not an option:
//! the agent refuses a whole collection that contains one.

mod line;

use std::collections::HashMap;
use std::fmt;

use self::line::{
    RawSample, parse_float, read_declared_name, read_sample, skip_blanks, split_token,
    unescape_help,
};
use picket_plugin_sdk::types::{
    Bucket, Family, Histogram, Label, MetricKind, Quantile, Sample, Summary, Value,
};

/// The `Accept` header for scrapes: OpenMetrics 1.0.0 preferred, then text 0.0.4.
pub const ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// How long an excerpt of a bad line an error quotes, in characters.
const EXCERPT_CHARS: usize = 120;

/// Most labels one sample may carry: Picket's limit per series on the wire
/// (`picket_core::codec::MAX_LABELS_PER_SERIES`), which the agent and the aggregator enforce
/// anyway. Checking it while reading keeps a line's label checks linear: a push of one line
/// with a million labels must not keep the aggregator busy for hours.
pub const MAX_LABELS: usize = 128;

/// Which exposition format a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text exposition format 0.0.4.
    Text,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

impl Format {
    /// Picks the parser from a response's `Content-Type`. Anything but OpenMetrics, or no
    /// header at all, is read as text 0.0.4, as Prometheus does.
    pub fn from_content_type(content_type: Option<&str>) -> Format {
        let media_type = content_type
            .and_then(|value| value.split(';').next())
            .map(str::trim)
            .unwrap_or("");
        if media_type.eq_ignore_ascii_case("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Families in the order their first sample appeared; families without samples are left
    /// out.
    pub families: Vec<Family>,
    /// Series that were read but cannot be represented, and so were left out.
    pub invalid: Vec<InvalidSeries>,
}

impl Parsed {
    /// Series in [`Parsed::families`] (a summary or histogram counts once).
    pub fn series_count(&self) -> usize {
        self.families.iter().map(|f| f.samples.len()).sum()
    }
}

/// A series left out because Picket's model cannot hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSeries {
    /// The first line of the series.
    pub line: usize,
    /// The family name and labels, `foo{a="1"}`.
    pub series: String,
    pub reason: Unrepresentable,
}

impl fmt::Display for InvalidSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.series, self.reason)
    }
}

/// Why a series cannot be represented.
#[derive(Debug, Clone, PartialEq)]
pub enum Unrepresentable {
    NoQuantileLabel,
    BadQuantile(String),
    QuantileOutOfRange(f64),
    NoLeLabel,
    BadLe(String),
    DuplicateBucket(f64),
    DecreasingBuckets,
    BucketAboveCount,
    BadCount(f64),
    NoCount,
    NoCountOrInfBucket,
    HistogramSampleWithoutSuffix,
}

impl fmt::Display for Unrepresentable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unrepresentable::NoQuantileLabel => write!(f, "summary sample has no quantile label"),
            Unrepresentable::BadQuantile(text) => write!(f, "quantile {text:?} is not a number"),
            Unrepresentable::QuantileOutOfRange(q) => write!(f, "quantile {q} is outside [0, 1]"),
            Unrepresentable::NoLeLabel => write!(f, "histogram bucket has no le label"),
            Unrepresentable::BadLe(text) => write!(f, "bucket bound le={text:?} is not a number"),
            Unrepresentable::DuplicateBucket(le) => write!(f, "bucket le={le} appears twice"),
            Unrepresentable::DecreasingBuckets => {
                write!(f, "bucket counts decrease as the bound grows")
            }
            Unrepresentable::BucketAboveCount => {
                write!(f, "a bucket count exceeds the total count")
            }
            Unrepresentable::BadCount(v) => write!(f, "count {v} is not a non-negative number"),
            Unrepresentable::NoCount => write!(f, "summary has no _count sample"),
            Unrepresentable::NoCountOrInfBucket => {
                write!(f, "histogram has neither a _count sample nor a +Inf bucket")
            }
            Unrepresentable::HistogramSampleWithoutSuffix => write!(
                f,
                "histogram sample without a _bucket, _sum or _count suffix"
            ),
        }
    }
}

/// Why an exposition could not be read, with the line it happened on (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub problem: Problem,
    /// The start of the offending line, for the operator.
    pub excerpt: String,
}

impl ParseError {
    fn new(line: usize, problem: Problem, text: &str) -> ParseError {
        ParseError {
            line,
            problem,
            excerpt: excerpt(text),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)?;
        if !self.excerpt.is_empty() {
            write!(f, ": `{}`", self.excerpt)?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    NotUtf8,
    BadMetricName(String),
    QuotedName(String),
    BadLabelName(String),
    ExpectedEquals {
        label: String,
    },
    ExpectedQuote {
        label: String,
    },
    UnterminatedLabelValue {
        label: String,
    },
    ExpectedCommaOrBrace {
        label: String,
    },
    UnterminatedLabels,
    DuplicateLabel(String),
    TooManyLabels,
    MissingValue,
    BadValue(String),
    BadTimestamp {
        text: String,
        format: Format,
    },
    TrailingText(String),
    MissingName {
        keyword: &'static str,
    },
    MissingType {
        name: String,
    },
    UnknownType(String),
    ConflictingType {
        name: String,
        earlier: DeclaredKind,
        now: DeclaredKind,
    },
    TypeAfterSamples {
        name: String,
    },
    MixedFamily {
        name: String,
    },
    ContentAfterEof {
        eof_line: usize,
    },
    MissingEof,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotUtf8 => write!(f, "not valid UTF-8"),
            Problem::BadMetricName(text) => write!(
                f,
                "invalid metric name {text:?} (expected [a-zA-Z_:][a-zA-Z0-9_:]*)"
            ),
            Problem::QuotedName(text) => write!(
                f,
                "quoted name {text} is not supported (targets escape UTF-8 names to \
                 underscores unless asked not to)"
            ),
            Problem::BadLabelName(text) => write!(
                f,
                "invalid label name {text:?} (expected [a-zA-Z_][a-zA-Z0-9_]*)"
            ),
            Problem::ExpectedEquals { label } => {
                write!(f, "expected '=' after label name {label}")
            }
            Problem::ExpectedQuote { label } => {
                write!(f, "expected '\"' to open the value of label {label}")
            }
            Problem::UnterminatedLabelValue { label } => {
                write!(f, "the value of label {label} has no closing '\"'")
            }
            Problem::ExpectedCommaOrBrace { label } => {
                write!(f, "expected ',' or '}}' after the value of label {label}")
            }
            Problem::UnterminatedLabels => write!(f, "the label list has no closing '}}'"),
            Problem::DuplicateLabel(name) => write!(f, "label {name} appears twice"),
            Problem::TooManyLabels => write!(f, "more than {MAX_LABELS} labels on one sample"),
            Problem::MissingValue => write!(f, "the sample has no value"),
            Problem::BadValue(text) => write!(
                f,
                "value {text:?} is not a number (expected a float, NaN, +Inf or -Inf)"
            ),
            Problem::BadTimestamp { text, format } => match format {
                Format::Text => write!(
                    f,
                    "timestamp {text:?} is not a whole number of milliseconds"
                ),
                Format::OpenMetrics => write!(
                    f,
                    "timestamp {text:?} is not a number of seconds since the epoch"
                ),
            },
            Problem::TrailingText(text) => write!(f, "unexpected {text:?} after the sample"),
            Problem::MissingName { keyword } => write!(f, "# {keyword} has no metric name"),
            Problem::MissingType { name } => write!(f, "# TYPE {name} has no type"),
            Problem::UnknownType(text) => write!(
                f,
                "unknown metric type {text:?} (expected counter, gauge, histogram, summary, \
                 untyped, unknown, gaugehistogram, info or stateset)"
            ),
            Problem::ConflictingType { name, earlier, now } => write!(
                f,
                "# TYPE {name} {now} contradicts the earlier # TYPE {name} {earlier}"
            ),
            Problem::TypeAfterSamples { name } => write!(
                f,
                "# TYPE {name} comes after samples of {name}; it must come first"
            ),
            Problem::MixedFamily { name } => write!(
                f,
                "{name} is used both as a plain series and as a summary or histogram"
            ),
            Problem::ContentAfterEof { eof_line } => {
                write!(f, "content after # EOF (on line {eof_line})")
            }
            Problem::MissingEof => write!(
                f,
                "the OpenMetrics exposition does not end with # EOF (truncated?)"
            ),
        }
    }
}

/// A metric type as declared by `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclaredKind {
    Counter,
    Gauge,
    Untyped,
    Summary,
    Histogram,
    GaugeHistogram,
    Info,
    StateSet,
}

impl DeclaredKind {
    /// Both formats' type words are accepted in both: mislabelled content types are common.
    fn from_word(word: &str) -> Option<DeclaredKind> {
        Some(match word {
            "counter" => DeclaredKind::Counter,
            "gauge" => DeclaredKind::Gauge,
            "untyped" | "unknown" => DeclaredKind::Untyped,
            "summary" => DeclaredKind::Summary,
            "histogram" => DeclaredKind::Histogram,
            "gaugehistogram" => DeclaredKind::GaugeHistogram,
            "info" => DeclaredKind::Info,
            "stateset" => DeclaredKind::StateSet,
            _ => return None,
        })
    }
}

impl fmt::Display for DeclaredKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self {
            DeclaredKind::Counter => "counter",
            DeclaredKind::Gauge => "gauge",
            DeclaredKind::Untyped => "untyped",
            DeclaredKind::Summary => "summary",
            DeclaredKind::Histogram => "histogram",
            DeclaredKind::GaugeHistogram => "gaugehistogram",
            DeclaredKind::Info => "info",
            DeclaredKind::StateSet => "stateset",
        };
        f.write_str(word)
    }
}

/// Parses a response body.
pub fn parse(body: &[u8], format: Format) -> Result<Parsed, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| not_utf8_error(body, e.valid_up_to()))?;
    parse_str(text, format)
}

/// Parses an exposition that is already text.
pub fn parse_str(text: &str, format: Format) -> Result<Parsed, ParseError> {
    let mut parser = Parser::new(format);
    let mut eof_line = None;
    let mut last_line = 1;
    for (index, raw_line) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        if skip_blanks(line).is_empty() {
            continue;
        }
        if let Some(eof_line) = eof_line {
            return Err(ParseError::new(
                number,
                Problem::ContentAfterEof { eof_line },
                line,
            ));
        }
        last_line = number;
        match parser.line(number, line) {
            Ok(LineKind::Eof) => eof_line = Some(number),
            Ok(LineKind::Other) => {}
            Err(problem) => return Err(ParseError::new(number, problem, line)),
        }
    }
    if format == Format::OpenMetrics && eof_line.is_none() {
        return Err(ParseError::new(last_line, Problem::MissingEof, ""));
    }
    Ok(parser.finish())
}

fn not_utf8_error(body: &[u8], valid_up_to: usize) -> ParseError {
    let valid = &body[..valid_up_to];
    let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line_end = body[line_start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(body.len(), |i| line_start + i);
    let text = String::from_utf8_lossy(&body[line_start..line_end]);
    ParseError::new(line, Problem::NotUtf8, &text)
}

fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

enum LineKind {
    Eof,
    Other,
}

/// What `# HELP` and `# TYPE` said about a name.
#[derive(Default)]
struct Declared {
    kind: Option<DeclaredKind>,
    help: Option<String>,
}

/// What a sample line contributes to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// A number sample of a family named after the sample, with this kind.
    Number(MetricKind),
    Quantile,
    Bucket,
    Sum,
    Count,
    /// OpenMetrics `_created`.
    Ignored,
    /// A histogram's own name used as a sample name.
    NeedsSuffix,
}

/// Where a sample goes: the output family (a slice of the sample name) and its role there.
struct Destination<'n> {
    family: &'n str,
    /// The family whose `# HELP` applies.
    declared_as: &'n str,
    role: Role,
    /// For summary and histogram roles, which of the two.
    group_kind: MetricKind,
}

/// An output family being built.
struct Output {
    name: String,
    kind: MetricKind,
    declared_as: String,
    series: Series,
}

enum Series {
    Numbers(Vec<Sample>),
    Groups {
        groups: Vec<Group>,
        by_labels: HashMap<Vec<(String, String)>, usize>,
    },
}

/// The lines of one summary or histogram series (one label set), gathered.
struct Group {
    labels: Vec<Label>,
    first_line: usize,
    timestamp_ms: Option<i64>,
    quantiles: Vec<Quantile>,
    /// Bound and count as written; converted and checked at the end.
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
    invalid: Option<(usize, Unrepresentable)>,
}

struct Parser {
    format: Format,
    declared: HashMap<String, Declared>,
    outputs: Vec<Output>,
    output_index: HashMap<String, usize>,
    invalid: Vec<InvalidSeries>,
}

impl Parser {
    fn new(format: Format) -> Parser {
        Parser {
            format,
            declared: HashMap::new(),
            outputs: Vec::new(),
            output_index: HashMap::new(),
            invalid: Vec::new(),
        }
    }

    fn line(&mut self, number: usize, line: &str) -> Result<LineKind, Problem> {
        let line = skip_blanks(line);
        match line.strip_prefix('#') {
            Some(comment) => self.comment(comment),
            None => {
                self.sample(number, line)?;
                Ok(LineKind::Other)
            }
        }
    }

    /// `# HELP`, `# TYPE`, `# UNIT`, `# EOF`, or a plain comment.
    fn comment(&mut self, comment: &str) -> Result<LineKind, Problem> {
        let (keyword, rest) = split_token(skip_blanks(comment));
        match keyword {
            "HELP" => self.help(rest)?,
            "TYPE" => self.declare_type(rest)?,
            "UNIT" if self.format == Format::OpenMetrics => {
                read_declared_name(rest, "UNIT")?;
            }
            "EOF" if self.format == Format::OpenMetrics && skip_blanks(rest).is_empty() => {
                return Ok(LineKind::Eof);
            }
            _ => {}
        }
        Ok(LineKind::Other)
    }

    fn help(&mut self, rest: &str) -> Result<(), Problem> {
        let (name, text) = read_declared_name(rest, "HELP")?;
        let help = unescape_help(skip_blanks(text));
        self.declared.entry(name.to_owned()).or_default().help = Some(help);
        Ok(())
    }

    fn declare_type(&mut self, rest: &str) -> Result<(), Problem> {
        let (name, rest) = read_declared_name(rest, "TYPE")?;
        let (word, trailing) = split_token(skip_blanks(rest));
        if word.is_empty() {
            return Err(Problem::MissingType {
                name: name.to_owned(),
            });
        }
        let kind =
            DeclaredKind::from_word(word).ok_or_else(|| Problem::UnknownType(word.into()))?;
        let trailing = skip_blanks(trailing);
        if !trailing.is_empty() {
            return Err(Problem::TrailingText(trailing.to_owned()));
        }
        let samples_seen = self.output_index.contains_key(name);
        let declared = self.declared.entry(name.to_owned()).or_default();
        match declared.kind {
            Some(earlier) if earlier != kind => Err(Problem::ConflictingType {
                name: name.to_owned(),
                earlier,
                now: kind,
            }),
            Some(_) => Ok(()),
            None if samples_seen => Err(Problem::TypeAfterSamples {
                name: name.to_owned(),
            }),
            None => {
                declared.kind = Some(kind);
                Ok(())
            }
        }
    }

    fn sample(&mut self, number: usize, line: &str) -> Result<(), Problem> {
        let raw = read_sample(line, self.format)?;
        let destination = self.resolve(raw.name);
        match destination.role {
            Role::Ignored => Ok(()),
            Role::NeedsSuffix => {
                self.invalid.push(InvalidSeries {
                    line: number,
                    series: render_series(raw.name, &raw.labels),
                    reason: Unrepresentable::HistogramSampleWithoutSuffix,
                });
                Ok(())
            }
            Role::Number(kind) => self.add_number(&destination, kind, raw),
            Role::Quantile | Role::Bucket | Role::Sum | Role::Count => {
                self.add_to_group(number, &destination, raw)
            }
        }
    }

    /// Finds the family a sample name belongs to: its own declared name first, then a declared
    /// family the name extends with a suffix that family's type uses.
    fn resolve<'n>(&self, name: &'n str) -> Destination<'n> {
        if let Some(kind) = self.declared_kind(name) {
            let role = match kind {
                DeclaredKind::Counter => Role::Number(MetricKind::Counter),
                DeclaredKind::Gauge | DeclaredKind::Info | DeclaredKind::StateSet => {
                    Role::Number(MetricKind::Gauge)
                }
                DeclaredKind::Untyped => Role::Number(MetricKind::Untyped),
                DeclaredKind::Summary => Role::Quantile,
                DeclaredKind::Histogram | DeclaredKind::GaugeHistogram => Role::NeedsSuffix,
            };
            return Destination {
                family: name,
                declared_as: name,
                role,
                group_kind: group_kind(kind),
            };
        }
        for suffix in SUFFIXES {
            let Some(base) = name.strip_suffix(suffix) else {
                continue;
            };
            let Some(kind) = self.declared_kind(base) else {
                continue;
            };
            let Some(role) = suffix_role(suffix, kind, self.format) else {
                continue;
            };
            let family = match role {
                Role::Number(_) => name,
                _ => base,
            };
            return Destination {
                family,
                declared_as: base,
                role,
                group_kind: group_kind(kind),
            };
        }
        Destination {
            family: name,
            declared_as: name,
            role: Role::Number(MetricKind::Untyped),
            group_kind: MetricKind::Untyped,
        }
    }

    fn declared_kind(&self, name: &str) -> Option<DeclaredKind> {
        self.declared
            .get(name)
            .map(|d| d.kind.unwrap_or(DeclaredKind::Untyped))
    }

    fn output(&mut self, destination: &Destination, kind: MetricKind, grouped: bool) -> usize {
        if let Some(&index) = self.output_index.get(destination.family) {
            return index;
        }
        let series = if grouped {
            Series::Groups {
                groups: Vec::new(),
                by_labels: HashMap::new(),
            }
        } else {
            Series::Numbers(Vec::new())
        };
        self.outputs.push(Output {
            name: destination.family.to_owned(),
            kind,
            declared_as: destination.declared_as.to_owned(),
            series,
        });
        let index = self.outputs.len() - 1;
        self.output_index
            .insert(destination.family.to_owned(), index);
        index
    }

    fn add_number(
        &mut self,
        destination: &Destination,
        kind: MetricKind,
        raw: RawSample,
    ) -> Result<(), Problem> {
        let index = self.output(destination, kind, false);
        let Series::Numbers(samples) = &mut self.outputs[index].series else {
            return Err(Problem::MixedFamily {
                name: destination.family.to_owned(),
            });
        };
        samples.push(Sample {
            labels: raw.labels,
            value: Value::Number(raw.value),
            timestamp_ms: raw.timestamp_ms,
        });
        Ok(())
    }

    fn add_to_group(
        &mut self,
        number: usize,
        destination: &Destination,
        mut raw: RawSample,
    ) -> Result<(), Problem> {
        let index = self.output(destination, destination.group_kind, true);
        let Series::Groups { groups, by_labels } = &mut self.outputs[index].series else {
            return Err(Problem::MixedFamily {
                name: destination.family.to_owned(),
            });
        };
        let special = match destination.role {
            Role::Quantile => Some("quantile"),
            Role::Bucket => Some("le"),
            _ => None,
        };
        let special_value = special.and_then(|name| take_label(&mut raw.labels, name));
        let key = label_key(&raw.labels);
        let group_index = *by_labels.entry(key).or_insert_with(|| {
            groups.push(Group::new(raw.labels, number));
            groups.len() - 1
        });
        let group = &mut groups[group_index];
        if group.timestamp_ms.is_none() {
            group.timestamp_ms = raw.timestamp_ms;
        }
        match destination.role {
            Role::Quantile => group.add_quantile(number, special_value, raw.value),
            Role::Bucket => group.add_bucket(number, special_value, raw.value),
            Role::Sum => group.sum = Some(raw.value),
            Role::Count => group.count = Some(raw.value),
            Role::Number(_) | Role::Ignored | Role::NeedsSuffix => {}
        }
        Ok(())
    }

    fn finish(self) -> Parsed {
        let Parser {
            declared,
            outputs,
            mut invalid,
            ..
        } = self;
        let mut families = Vec::with_capacity(outputs.len());
        for output in outputs {
            let help = declared
                .get(&output.declared_as)
                .and_then(|d| d.help.clone())
                .unwrap_or_default();
            let samples = match output.series {
                Series::Numbers(samples) => samples,
                Series::Groups { groups, .. } => {
                    finish_groups(&output.name, output.kind, groups, &mut invalid)
                }
            };
            if !samples.is_empty() {
                families.push(Family {
                    name: output.name,
                    kind: output.kind,
                    help,
                    samples,
                });
            }
        }
        invalid.sort_by_key(|i| i.line);
        Parsed { families, invalid }
    }
}

/// Suffixes a sample name may add to its family's name; `_gsum` and `_gcount` come before the
/// `_sum` and `_count` they end with.
const SUFFIXES: [&str; 8] = [
    "_total", "_created", "_bucket", "_gsum", "_gcount", "_sum", "_count", "_info",
];

fn suffix_role(suffix: &str, kind: DeclaredKind, format: Format) -> Option<Role> {
    use DeclaredKind as K;
    let openmetrics = format == Format::OpenMetrics;
    Some(match (suffix, kind) {
        ("_total", K::Counter) => Role::Number(MetricKind::Counter),
        ("_created", K::Counter | K::Summary | K::Histogram) if openmetrics => Role::Ignored,
        ("_bucket", K::Histogram) => Role::Bucket,
        ("_sum", K::Histogram | K::Summary) => Role::Sum,
        ("_count", K::Histogram | K::Summary) => Role::Count,
        ("_bucket" | "_gsum" | "_gcount", K::GaugeHistogram) => Role::Number(MetricKind::Gauge),
        ("_info", K::Info) => Role::Number(MetricKind::Gauge),
        _ => return None,
    })
}

fn group_kind(kind: DeclaredKind) -> MetricKind {
    match kind {
        DeclaredKind::Summary => MetricKind::Summary,
        DeclaredKind::Histogram => MetricKind::Histogram,
        _ => MetricKind::Untyped,
    }
}

fn finish_groups(
    family: &str,
    kind: MetricKind,
    groups: Vec<Group>,
    invalid: &mut Vec<InvalidSeries>,
) -> Vec<Sample> {
    let mut samples = Vec::with_capacity(groups.len());
    for group in groups {
        let labels = group.labels.clone();
        let converted = match kind {
            MetricKind::Summary => group.into_summary(),
            _ => group.into_histogram(),
        };
        match converted {
            Ok(sample) => samples.push(sample),
            Err((line, reason)) => invalid.push(InvalidSeries {
                line,
                series: render_series(family, &labels),
                reason,
            }),
        }
    }
    samples
}

impl Group {
    fn new(labels: Vec<Label>, first_line: usize) -> Group {
        Group {
            labels,
            first_line,
            timestamp_ms: None,
            quantiles: Vec::new(),
            buckets: Vec::new(),
            sum: None,
            count: None,
            invalid: None,
        }
    }

    fn mark_invalid(&mut self, line: usize, reason: Unrepresentable) {
        if self.invalid.is_none() {
            self.invalid = Some((line, reason));
        }
    }

    fn add_quantile(&mut self, line: usize, quantile: Option<String>, value: f64) {
        let Some(text) = quantile else {
            return self.mark_invalid(line, Unrepresentable::NoQuantileLabel);
        };
        match parse_float(&text) {
            Some(quantile) => self.quantiles.push(Quantile { quantile, value }),
            None => self.mark_invalid(line, Unrepresentable::BadQuantile(text)),
        }
    }

    fn add_bucket(&mut self, line: usize, le: Option<String>, count: f64) {
        let Some(text) = le else {
            return self.mark_invalid(line, Unrepresentable::NoLeLabel);
        };
        match parse_float(&text) {
            Some(bound) if !bound.is_nan() => self.buckets.push((bound, count)),
            _ => self.mark_invalid(line, Unrepresentable::BadLe(text)),
        }
    }

    fn into_summary(self) -> Result<Sample, (usize, Unrepresentable)> {
        if let Some(invalid) = self.invalid {
            return Err(invalid);
        }
        let line = self.first_line;
        if let Some(q) = self
            .quantiles
            .iter()
            .find(|q| !(0.0..=1.0).contains(&q.quantile))
        {
            return Err((line, Unrepresentable::QuantileOutOfRange(q.quantile)));
        }
        let count = self.count.ok_or((line, Unrepresentable::NoCount))?;
        let count = to_count(count).ok_or((line, Unrepresentable::BadCount(count)))?;
        Ok(Sample {
            labels: self.labels,
            value: Value::Summary(Summary {
                count,
                sum: self.sum.unwrap_or(f64::NAN),
                quantiles: self.quantiles,
            }),
            timestamp_ms: self.timestamp_ms,
        })
    }

    fn into_histogram(mut self) -> Result<Sample, (usize, Unrepresentable)> {
        if let Some(invalid) = self.invalid {
            return Err(invalid);
        }
        let line = self.first_line;
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut buckets: Vec<Bucket> = Vec::with_capacity(self.buckets.len());
        for &(upper_bound, count) in &self.buckets {
            let cumulative_count =
                to_count(count).ok_or((line, Unrepresentable::BadCount(count)))?;
            if let Some(previous) = buckets.last() {
                if previous.upper_bound == upper_bound {
                    return Err((line, Unrepresentable::DuplicateBucket(upper_bound)));
                }
                if previous.cumulative_count > cumulative_count {
                    return Err((line, Unrepresentable::DecreasingBuckets));
                }
            }
            buckets.push(Bucket {
                upper_bound,
                cumulative_count,
            });
        }
        let count = match self.count {
            Some(count) => to_count(count).ok_or((line, Unrepresentable::BadCount(count)))?,
            None => buckets
                .last()
                .filter(|b| b.upper_bound == f64::INFINITY)
                .map(|b| b.cumulative_count)
                .ok_or((line, Unrepresentable::NoCountOrInfBucket))?,
        };
        if buckets.last().is_some_and(|b| b.cumulative_count > count) {
            return Err((line, Unrepresentable::BucketAboveCount));
        }
        // The +Inf bucket is the count by definition; quantile estimates need it.
        if buckets
            .last()
            .is_none_or(|b| b.upper_bound != f64::INFINITY)
        {
            buckets.push(Bucket {
                upper_bound: f64::INFINITY,
                cumulative_count: count,
            });
        }
        Ok(Sample {
            labels: self.labels,
            value: Value::Histogram(Histogram {
                count,
                sum: self.sum.unwrap_or(f64::NAN),
                buckets,
            }),
            timestamp_ms: self.timestamp_ms,
        })
    }
}

/// A count as written (a float) → a whole count. Exporters write counts as floats (`12.0`,
/// `1.2E7`); fractions are rounded.
fn to_count(value: f64) -> Option<u64> {
    // 2^64 as f64; anything at or above it does not fit.
    const LIMIT: f64 = 18_446_744_073_709_551_616.0;
    (0.0..LIMIT).contains(&value).then(|| value.round() as u64)
}

/// Removes the label `name` and returns its value.
fn take_label(labels: &mut Vec<Label>, name: &str) -> Option<String> {
    let position = labels.iter().position(|l| l.name == name)?;
    Some(labels.remove(position).value)
}

/// A label set as an order-independent key.
fn label_key(labels: &[Label]) -> Vec<(String, String)> {
    let mut key: Vec<(String, String)> = labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect();
    key.sort();
    key
}

/// `name{a="1",b="2"}`, for messages.
pub fn render_series(name: &str, labels: &[Label]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels
        .iter()
        .map(|l| format!("{}={:?}", l.name, l.value))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

#[cfg(test)]
mod tests;
