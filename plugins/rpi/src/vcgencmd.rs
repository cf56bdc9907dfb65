//! The vcgencmd commands this plugin runs and pure parsers for their answers.
//!
//! vcgencmd asks the VideoCore firmware and prints one `key=value` line, for example
//! `temp=48.3'C`, `throttled=0x50005`, `frequency(48)=1500398464` or `volt=0.8563V`. When the
//! firmware does not know a command it prints `error=2 error_msg="Command not registered"`
//! instead (with exit status 0 on some firmware releases), so the status alone cannot be
//! trusted. The parsers are strict about the shape: a line that does not look exactly right
//! is reported as unexpected rather than guessed at, because a wrong number on a dashboard is
//! worse than a missing one.

use std::fmt;

/// A vcgencmd query this plugin makes. The argument lists are fixed so that an operator can
/// grant exactly these four and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    MeasureTemp,
    GetThrottled,
    MeasureClockArm,
    MeasureVoltsCore,
}

impl Command {
    pub const ALL: [Command; 4] = [
        Command::MeasureTemp,
        Command::GetThrottled,
        Command::MeasureClockArm,
        Command::MeasureVoltsCore,
    ];

    /// The arguments passed to vcgencmd (and written in the exec grant).
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Command::MeasureTemp => &["measure_temp"],
            Command::GetThrottled => &["get_throttled"],
            Command::MeasureClockArm => &["measure_clock", "arm"],
            Command::MeasureVoltsCore => &["measure_volts", "core"],
        }
    }

    /// The value of the `command` label: the arguments joined with `_`.
    pub fn label(self) -> &'static str {
        match self {
            Command::MeasureTemp => "measure_temp",
            Command::GetThrottled => "get_throttled",
            Command::MeasureClockArm => "measure_clock_arm",
            Command::MeasureVoltsCore => "measure_volts_core",
        }
    }

    /// The position in [`Command::ALL`], for per-command counters.
    pub fn index(self) -> usize {
        match self {
            Command::MeasureTemp => 0,
            Command::GetThrottled => 1,
            Command::MeasureClockArm => 2,
            Command::MeasureVoltsCore => 3,
        }
    }
}

/// Why an answer could not be used.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputError {
    /// Nothing (or only whitespace) on stdout.
    Empty,
    /// vcgencmd's own error line, e.g. `error=2 error_msg="Command not registered"`.
    Reported { code: String, message: String },
    /// Anything else that is not the expected line; `got` is the text, shortened.
    Unexpected { expected: &'static str, got: String },
}

impl OutputError {
    /// A short, stable name for the kind of failure, so the plugin can log each kind once.
    pub fn kind(&self) -> &'static str {
        match self {
            OutputError::Empty => "empty",
            OutputError::Reported { .. } => "reported",
            OutputError::Unexpected { .. } => "unexpected",
        }
    }
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputError::Empty => write!(f, "empty output"),
            OutputError::Reported { code, message } if message.is_empty() => {
                write!(f, "vcgencmd reported error {code}")
            }
            OutputError::Reported { code, message } => {
                write!(f, "vcgencmd reported error {code}: {message}")
            }
            OutputError::Unexpected { expected, got } => {
                write!(f, "expected {expected}, got {got:?}")
            }
        }
    }
}

/// Longest piece of an unexpected answer kept for the log: enough to recognise it, not
/// enough for a confused program to fill the log.
pub const MAX_QUOTED_CHARS: usize = 120;

/// `text` cut to [`MAX_QUOTED_CHARS`] characters, marked when cut.
pub fn shorten(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(MAX_QUOTED_CHARS).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// The trimmed answer, or the error vcgencmd reported in place of one.
fn answer(text: &str) -> Result<&str, OutputError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(OutputError::Empty);
    }
    if let Some(rest) = text.strip_prefix("error=") {
        let (code, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let tail = tail.trim();
        let message = tail
            .strip_prefix("error_msg=")
            .map(|m| m.trim_matches('"'))
            .unwrap_or(tail);
        return Err(OutputError::Reported {
            code: shorten(code),
            message: shorten(message),
        });
    }
    Ok(text)
}

fn unexpected(expected: &'static str, got: &str) -> OutputError {
    OutputError::Unexpected {
        expected,
        got: shorten(got),
    }
}

/// A plain decimal (`48.3`, `-2`, `0.8563`). Written by hand because `f64::from_str` also
/// takes `inf`, `NaN`, `1e9` and a leading `+`, none of which vcgencmd prints: accepting them
/// would let garbage through as a number.
fn decimal(text: &str) -> Option<f64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let well_formed = !whole.is_empty()
        && all_digits(whole)
        && all_digits(fraction)
        && !(digits.contains('.') && fraction.is_empty());
    if !well_formed {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `measure_temp`: `temp=48.3'C` → 48.3 (degrees Celsius).
pub fn parse_temp(text: &str) -> Result<f64, OutputError> {
    const EXPECTED: &str = "temp=<degrees>'C";
    let line = answer(text)?;
    let value = line
        .strip_prefix("temp=")
        // Current firmware prints an apostrophe; a degree sign has been seen in the wild.
        .and_then(|v| v.strip_suffix("'C").or_else(|| v.strip_suffix("°C")))
        .and_then(decimal)
        .ok_or_else(|| unexpected(EXPECTED, line))?;
    Ok(value)
}

/// `get_throttled`: `throttled=0x50005` → 0x50005.
pub fn parse_throttled(text: &str) -> Result<u32, OutputError> {
    const EXPECTED: &str = "throttled=0x<hex>";
    let line = answer(text)?;
    let hex = line
        .strip_prefix("throttled=0x")
        .or_else(|| line.strip_prefix("throttled=0X"))
        .ok_or_else(|| unexpected(EXPECTED, line))?;
    // `from_str_radix` alone would also take a sign.
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unexpected(EXPECTED, line));
    }
    u32::from_str_radix(hex, 16).map_err(|_| unexpected(EXPECTED, line))
}

/// `measure_clock arm`: `frequency(48)=1500398464` → 1500398464 (hertz). The number in
/// brackets is the firmware's clock id, which differs between models, so it is not checked.
pub fn parse_clock(text: &str) -> Result<u64, OutputError> {
    const EXPECTED: &str = "frequency(<id>)=<hertz>";
    let line = answer(text)?;
    let hertz = line
        .strip_prefix("frequency(")
        .and_then(|rest| rest.split_once(")="))
        .filter(|(id, _)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .map(|(_, hertz)| hertz)
        .filter(|hertz| !hertz.is_empty() && hertz.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|hertz| hertz.parse::<u64>().ok())
        .ok_or_else(|| unexpected(EXPECTED, line))?;
    Ok(hertz)
}

/// `measure_volts core`: `volt=0.8563V` → 0.8563 (volts).
pub fn parse_volts(text: &str) -> Result<f64, OutputError> {
    const EXPECTED: &str = "volt=<volts>V";
    let line = answer(text)?;
    line.strip_prefix("volt=")
        .and_then(|v| v.strip_suffix('V'))
        .and_then(decimal)
        .ok_or_else(|| unexpected(EXPECTED, line))
}

/// One condition the firmware reports in `get_throttled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Condition {
    /// Bit set while the condition holds; the same condition "since boot" is this bit plus
    /// [`SINCE_BOOT_SHIFT`].
    pub bit: u32,
    /// The `condition` label value.
    pub name: &'static str,
    pub meaning: &'static str,
}

/// The documented `get_throttled` bits (Raspberry Pi documentation, "vcgencmd"). Bits outside
/// this table are only visible in the raw value.
pub const CONDITIONS: [Condition; 4] = [
    Condition {
        bit: 0,
        name: "under_voltage",
        meaning: "under-voltage detected",
    },
    Condition {
        bit: 1,
        name: "arm_frequency_capped",
        meaning: "ARM frequency capped",
    },
    Condition {
        bit: 2,
        name: "throttled",
        meaning: "currently throttled",
    },
    Condition {
        bit: 3,
        name: "soft_temperature_limit",
        meaning: "soft temperature limit active",
    },
];

/// Bits 16..19 latch the conditions of bits 0..3 until the next boot.
pub const SINCE_BOOT_SHIFT: u32 = 16;

/// Whether a flag describes the present moment or anything since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Now,
    SinceBoot,
}

impl When {
    /// The `when` label value.
    pub fn label(self) -> &'static str {
        match self {
            When::Now => "now",
            When::SinceBoot => "since_boot",
        }
    }
}

/// One decoded flag of a `get_throttled` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    pub condition: &'static str,
    pub when: When,
    pub active: bool,
}

/// Every condition of [`CONDITIONS`], now and since boot, in table order: always eight
/// flags, so each series exists (as 0) before the condition first happens.
pub fn decode_throttled(raw: u32) -> Vec<Flag> {
    [When::Now, When::SinceBoot]
        .into_iter()
        .flat_map(|when| {
            CONDITIONS.iter().map(move |c| {
                let bit = match when {
                    When::Now => c.bit,
                    When::SinceBoot => c.bit + SINCE_BOOT_SHIFT,
                };
                Flag {
                    condition: c.name,
                    when,
                    active: raw & (1 << bit) != 0,
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(code: &str, message: &str) -> OutputError {
        OutputError::Reported {
            code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn temperatures() {
        assert_eq!(parse_temp("temp=48.3'C\n"), Ok(48.3));
        assert_eq!(parse_temp("temp=62.0'C"), Ok(62.0));
        assert_eq!(parse_temp("  temp=85.9'C  \n"), Ok(85.9));
        assert_eq!(parse_temp("temp=-4.5'C"), Ok(-4.5));
        assert_eq!(parse_temp("temp=40'C"), Ok(40.0));
        assert_eq!(parse_temp("temp=51.1°C"), Ok(51.1));
    }

    #[test]
    fn temperature_garbage() {
        for bad in [
            "temp=48.3",
            "temp='C",
            "temp=.5'C",
            "temp=5.'C",
            "temp=inf'C",
            "temp=NaN'C",
            "temp=1e3'C",
            "temp=+48.3'C",
            "temp=48.3'F",
            "temp=48.3'C\ntemp=49.0'C",
            "volt=0.8563V",
            "VCHI initialization failed",
        ] {
            assert!(
                matches!(parse_temp(bad), Err(OutputError::Unexpected { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(parse_temp(""), Err(OutputError::Empty));
        assert_eq!(parse_temp(" \n"), Err(OutputError::Empty));
    }

    #[test]
    fn vcgencmd_error_lines() {
        let line = "error=2 error_msg=\"Command not registered\"\n";
        assert_eq!(
            parse_temp(line),
            Err(reported("2", "Command not registered"))
        );
        assert_eq!(
            parse_throttled(line),
            Err(reported("2", "Command not registered"))
        );
        assert_eq!(
            parse_clock(line),
            Err(reported("2", "Command not registered"))
        );
        assert_eq!(
            parse_volts(line),
            Err(reported("2", "Command not registered"))
        );
        assert_eq!(parse_volts("error=1"), Err(reported("1", "")));
        assert_eq!(
            parse_clock("error=2 error_msg=\"Invalid arguments\""),
            Err(reported("2", "Invalid arguments"))
        );
        let e = parse_temp(line).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vcgencmd reported error 2: Command not registered"
        );
        assert_eq!(e.kind(), "reported");
    }

    #[test]
    fn throttled_values() {
        assert_eq!(parse_throttled("throttled=0x0\n"), Ok(0));
        assert_eq!(parse_throttled("throttled=0x50000"), Ok(0x50000));
        assert_eq!(parse_throttled("throttled=0x50005"), Ok(0x50005));
        assert_eq!(parse_throttled("throttled=0xe0000"), Ok(0xe0000));
        assert_eq!(parse_throttled("throttled=0xE0008"), Ok(0xe0008));
        assert_eq!(parse_throttled("throttled=0x80008"), Ok(0x80008));
    }

    #[test]
    fn throttled_garbage() {
        for bad in [
            "throttled=0x",
            "throttled=50005",
            "throttled=0x+5",
            "throttled=0x5000g",
            "throttled=0x123456789",
            "throttled=0x0 extra",
            "temp=48.3'C",
        ] {
            assert!(
                matches!(parse_throttled(bad), Err(OutputError::Unexpected { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(parse_throttled(""), Err(OutputError::Empty));
    }

    fn active(raw: u32) -> Vec<(&'static str, &'static str)> {
        decode_throttled(raw)
            .into_iter()
            .filter(|f| f.active)
            .map(|f| (f.condition, f.when.label()))
            .collect()
    }

    #[test]
    fn throttled_bits_decode() {
        assert_eq!(decode_throttled(0).len(), 8);
        assert!(active(0x0).is_empty());
        // Under-voltage and throttling happened earlier, nothing now.
        assert_eq!(
            active(0x50000),
            [("under_voltage", "since_boot"), ("throttled", "since_boot")]
        );
        // The same, and still going on: the classic weak power supply.
        assert_eq!(
            active(0x50005),
            [
                ("under_voltage", "now"),
                ("throttled", "now"),
                ("under_voltage", "since_boot"),
                ("throttled", "since_boot"),
            ]
        );
        // Ran hot earlier: capped, throttled and at the soft limit, no under-voltage.
        assert_eq!(
            active(0xe0000),
            [
                ("arm_frequency_capped", "since_boot"),
                ("throttled", "since_boot"),
                ("soft_temperature_limit", "since_boot"),
            ]
        );
        assert_eq!(active(0x2), [("arm_frequency_capped", "now")]);
        assert_eq!(active(0x8), [("soft_temperature_limit", "now")]);
        // Undocumented bits change nothing here.
        assert!(active(0xfff0_fff0).is_empty());
        assert_eq!(active(u32::MAX).len(), 8);
    }

    #[test]
    fn throttled_table_is_consistent() {
        for (i, c) in CONDITIONS.iter().enumerate() {
            assert_eq!(c.bit, i as u32);
            assert!(c.bit < SINCE_BOOT_SHIFT);
            assert!(c.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(!c.meaning.is_empty());
        }
    }

    #[test]
    fn clocks() {
        assert_eq!(parse_clock("frequency(48)=1500398464\n"), Ok(1_500_398_464));
        assert_eq!(parse_clock("frequency(48)=600117184"), Ok(600_117_184));
        assert_eq!(parse_clock("frequency(0)=2400000000"), Ok(2_400_000_000));
        assert_eq!(parse_clock("frequency(45)=0"), Ok(0));
    }

    #[test]
    fn clock_garbage() {
        for bad in [
            "frequency(48)=",
            "frequency()=600117184",
            "frequency(x)=600117184",
            "frequency(48)=-1",
            "frequency(48)=6.0e8",
            "frequency(48)=99999999999999999999999",
            "frequency(48)600117184",
            "frequency=600117184",
            "600117184",
        ] {
            assert!(
                matches!(parse_clock(bad), Err(OutputError::Unexpected { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(parse_clock("\n"), Err(OutputError::Empty));
    }

    #[test]
    fn volts() {
        assert_eq!(parse_volts("volt=0.8563V\n"), Ok(0.8563));
        assert_eq!(parse_volts("volt=1.2000V"), Ok(1.2));
        assert_eq!(parse_volts("volt=1.35V"), Ok(1.35));
    }

    #[test]
    fn volt_garbage() {
        for bad in [
            "volt=1.2000",
            "volt=V",
            "volt=1.2.0V",
            "volt=1,2000V",
            "volt=infV",
            "volts=1.2000V",
            "\u{0}\u{1}binary",
        ] {
            assert!(
                matches!(parse_volts(bad), Err(OutputError::Unexpected { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn long_garbage_is_shortened_for_the_log() {
        let long = "x".repeat(10_000);
        let Err(OutputError::Unexpected { got, .. }) = parse_volts(&long) else {
            panic!("garbage parsed");
        };
        assert_eq!(got.chars().count(), MAX_QUOTED_CHARS + 1);
        assert!(got.ends_with('…'));
        // Multi-byte characters are cut on a character boundary, not mid-byte.
        let wide = "é".repeat(500);
        assert_eq!(shorten(&wide).chars().count(), MAX_QUOTED_CHARS + 1);
    }

    #[test]
    fn commands_have_stable_args_labels_and_indexes() {
        for (i, c) in Command::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(c.label(), c.args().join("_"));
        }
    }
}
