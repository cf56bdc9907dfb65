//! Reading one line: metric and label names, label lists with their escapes, values,
//! timestamps, and the parts of `# HELP`/`# TYPE` lines. Each function takes the unread rest
//! of a line and returns what it read plus what is left, so the callers read left to right
//! the way the formats are written.

use picket_plugin_sdk::types::Label;

use super::{Format, MAX_LABELS, Problem};

/// One sample line, read.
pub(super) struct RawSample<'a> {
    pub name: &'a str,
    pub labels: Vec<Label>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

pub(super) fn skip_blanks(text: &str) -> &str {
    text.trim_start_matches(is_blank)
}

/// The text up to the first blank, and the rest (starting at that blank).
pub(super) fn split_token(text: &str) -> (&str, &str) {
    text.split_at(text.find(is_blank).unwrap_or(text.len()))
}

/// The longest prefix of `text` made of name characters, and the rest.
fn split_name(text: &str, first: fn(char) -> bool, rest: fn(char) -> bool) -> (&str, &str) {
    let mut end = 0;
    for (i, c) in text.char_indices() {
        let allowed = if i == 0 { first(c) } else { rest(c) };
        if !allowed {
            break;
        }
        end = i + c.len_utf8();
    }
    text.split_at(end)
}

fn split_metric_name(text: &str) -> (&str, &str) {
    split_name(
        text,
        |c| c.is_ascii_alphabetic() || c == '_' || c == ':',
        |c| c.is_ascii_alphanumeric() || c == '_' || c == ':',
    )
}

fn split_label_name(text: &str) -> (&str, &str) {
    split_name(
        text,
        |c| c.is_ascii_alphabetic() || c == '_',
        |c| c.is_ascii_alphanumeric() || c == '_',
    )
}

/// The metric name of a `# HELP`, `# TYPE` or `# UNIT` line, and what follows it.
pub(super) fn read_declared_name<'a>(
    rest: &'a str,
    keyword: &'static str,
) -> Result<(&'a str, &'a str), Problem> {
    let rest = skip_blanks(rest);
    let (token, after) = split_token(rest);
    if token.is_empty() {
        return Err(Problem::MissingName { keyword });
    }
    let (name, unread) = split_metric_name(token);
    if !unread.is_empty() || name.is_empty() {
        return Err(name_problem(token, Problem::BadMetricName));
    }
    Ok((name, after))
}

fn name_problem(token: &str, otherwise: fn(String) -> Problem) -> Problem {
    if token.starts_with('"') || token.starts_with("{\"") {
        Problem::QuotedName(token.to_owned())
    } else {
        otherwise(token.to_owned())
    }
}

/// `# HELP` text: `\\` and `\n` (and OpenMetrics' `\"`) are escapes.
pub(super) fn unescape_help(text: &str) -> String {
    if !text.contains('\\') {
        return text.to_owned();
    }
    let mut help = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            help.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => help.push('\n'),
            Some('\\') => help.push('\\'),
            Some('"') => help.push('"'),
            Some(other) => {
                help.push('\\');
                help.push(other);
            }
            None => help.push('\\'),
        }
    }
    help
}

pub(super) fn read_sample(line: &str, format: Format) -> Result<RawSample<'_>, Problem> {
    let (name, rest) = split_metric_name(line);
    let name_ends_cleanly = rest.is_empty() || rest.starts_with(is_blank) || rest.starts_with('{');
    if name.is_empty() || !name_ends_cleanly {
        let end = line
            .find(|c: char| is_blank(c) || (c == '{' && !line.starts_with('{')))
            .unwrap_or(line.len());
        return Err(name_problem(&line[..end], Problem::BadMetricName));
    }
    let rest = skip_blanks(rest);
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inside) => read_labels(inside)?,
        None => (Vec::new(), rest),
    };
    let (value, timestamp_ms) = read_value_and_timestamp(rest, format)?;
    Ok(RawSample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// Reads `a="1", b="2"}` (the text after `{`); returns the labels and the text after `}`.
fn read_labels(mut rest: &str) -> Result<(Vec<Label>, &str), Problem> {
    let mut labels: Vec<Label> = Vec::new();
    loop {
        rest = skip_blanks(rest);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after_name) = read_label_name(rest)?;
        let after_equals = skip_blanks(after_name)
            .strip_prefix('=')
            .ok_or_else(|| Problem::ExpectedEquals { label: name.into() })?;
        let after_quote = skip_blanks(after_equals)
            .strip_prefix('"')
            .ok_or_else(|| Problem::ExpectedQuote { label: name.into() })?;
        let (value, after_value) = read_quoted(after_quote)
            .ok_or_else(|| Problem::UnterminatedLabelValue { label: name.into() })?;
        if labels.iter().any(|l| l.name == name) {
            return Err(Problem::DuplicateLabel(name.to_owned()));
        }
        // Before it gets any longer: the duplicate check above is linear in the labels read.
        if labels.len() == MAX_LABELS {
            return Err(Problem::TooManyLabels);
        }
        labels.push(Label {
            name: name.to_owned(),
            value,
        });
        let after_value = skip_blanks(after_value);
        if let Some(after) = after_value.strip_prefix(',') {
            rest = after;
        } else if let Some(after) = after_value.strip_prefix('}') {
            return Ok((labels, after));
        } else if after_value.is_empty() {
            return Err(Problem::UnterminatedLabels);
        } else {
            return Err(Problem::ExpectedCommaOrBrace { label: name.into() });
        }
    }
}

fn read_label_name(text: &str) -> Result<(&str, &str), Problem> {
    if text.is_empty() {
        return Err(Problem::UnterminatedLabels);
    }
    let (name, after) = split_label_name(text);
    let ends_cleanly = after.starts_with('=') || after.starts_with(is_blank);
    if name.is_empty() || !ends_cleanly {
        let end = text
            .find(|c: char| c == '=' || c == ',' || c == '}' || is_blank(c))
            .unwrap_or(text.len());
        // A lone separator (`{,}`) has no token of its own; show it.
        let token = if end == 0 {
            text.chars().next().map_or("", |c| &text[..c.len_utf8()])
        } else {
            &text[..end]
        };
        return Err(name_problem(token, Problem::BadLabelName));
    }
    Ok((name, after))
}

/// Reads a label value up to its closing quote (the opening one already consumed), undoing
/// `\\`, `\"` and `\n`. Other backslash pairs are kept as written, as Prometheus does.
/// None when the closing quote is missing.
fn read_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                '\\' => value.push('\\'),
                '"' => value.push('"'),
                other => {
                    value.push('\\');
                    value.push(other);
                }
            },
            c => value.push(c),
        }
    }
    None
}

fn read_value_and_timestamp(rest: &str, format: Format) -> Result<(f64, Option<i64>), Problem> {
    let mut tokens = rest.split(is_blank).filter(|t| !t.is_empty());
    let value_text = tokens.next().ok_or(Problem::MissingValue)?;
    let value = parse_float(value_text).ok_or_else(|| Problem::BadValue(value_text.into()))?;
    // An OpenMetrics exemplar (` # {trace_id="..."} 1.0`) may follow; it is ignored.
    let timestamp_ms = match tokens.next() {
        None => return Ok((value, None)),
        Some(token) if token.starts_with('#') => return Ok((value, None)),
        Some(token) => parse_timestamp(token, format).ok_or_else(|| Problem::BadTimestamp {
            text: token.into(),
            format,
        })?,
    };
    match tokens.next() {
        Some(token) if !token.starts_with('#') => Err(Problem::TrailingText(token.into())),
        _ => Ok((value, Some(timestamp_ms))),
    }
}

/// A sample value: any float Rust reads, which covers `NaN`, `+Inf`, `-Inf`, exponents
/// (`1.5E9`, as Java writes) and signs.
pub(super) fn parse_float(text: &str) -> Option<f64> {
    text.parse().ok()
}

fn parse_timestamp(text: &str, format: Format) -> Option<i64> {
    match format {
        Format::Text => text.parse().ok(),
        Format::OpenMetrics => seconds_to_ms(text),
    }
}

/// OpenMetrics timestamps are seconds with an optional fraction. Plain decimals are converted
/// exactly (a float would turn `1520879607.789` into ...788.99); sub-millisecond digits are
/// dropped. Exponent forms go through a float.
fn seconds_to_ms(text: &str) -> Option<i64> {
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !whole.is_empty() && all_digits(whole) && all_digits(fraction) {
        let whole: i64 = whole.parse().ok()?;
        let millis: i64 = fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0, |ms, digit| ms * 10 + i64::from(digit - b'0'));
        let ms = whole.checked_mul(1000)?.checked_add(millis)?;
        return Some(if negative { -ms } else { ms });
    }
    let ms = (text.parse::<f64>().ok()? * 1000.0).round();
    // i64::MAX as f64 rounds up to 2^63, which does not fit; stay strictly below it.
    (ms.is_finite() && ms.abs() < 9.2e18).then_some(ms as i64)
}
