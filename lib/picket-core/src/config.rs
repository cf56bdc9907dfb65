//! TOML config loading with errors an operator can act on.
//!
//! Every error names the file, the line and column, the key (as a dotted path such as
//! `aggregator.tls.ca`) and what is expected there, and quotes the offending line. Unknown keys
//! are errors (config structs use `deny_unknown_fields`), because a misspelt key that is
//! silently ignored is the most common way a monitoring agent ends up misconfigured.
//!
//! Checks that span several keys run after deserialising; they report through
//! [`ConfigError::at_key`], which finds the key's line in the source text.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A config error located in its source.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// File path, or a description such as `embedded defaults`.
    pub origin: String,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// Dotted key path, when known.
    pub key: Option<String>,
    pub message: String,
    /// The source line at `position`, quoted in the message.
    pub source_line: Option<String>,
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)?;
        if let (Some(text), Some((line, column))) = (&self.source_line, self.position) {
            let gutter = line.to_string().len();
            write!(
                f,
                "\n {:gutter$} |\n {line} | {text}\n {:gutter$} | {:>column$}",
                "", "", "^"
            )?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// An error about the config as a whole (no position).
    pub fn general(origin: &str, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            position: None,
            key: None,
            message: message.into(),
            source_line: None,
        }
    }

    /// An error about `key_path` (e.g. `["aggregator", "tls", "ca"]`), located in `text` when
    /// the key is written there. Array elements are addressed by their index as a string.
    pub fn at_key(origin: &str, text: &str, key_path: &[&str], message: impl Into<String>) -> Self {
        let offset = locate_key(text, key_path);
        let mut err = ConfigError {
            origin: origin.to_owned(),
            position: None,
            key: Some(key_path.join(".")),
            message: message.into(),
            source_line: None,
        };
        if let Some(offset) = offset {
            err.set_position(text, offset);
        }
        err
    }

    fn set_position(&mut self, text: &str, offset: usize) {
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..offset].chars().count() + 1;
        let line_end = text[line_start..]
            .find('\n')
            .map_or(text.len(), |i| line_start + i);
        self.position = Some((line, column));
        self.source_line = Some(text[line_start..line_end].trim_end_matches('\r').to_owned());
    }
}

/// Parses `text` (named `origin` in errors) into `T`.
pub fn parse<T: DeserializeOwned>(origin: &str, text: &str) -> Result<T, ConfigError> {
    let deserializer =
        toml::de::Deserializer::parse(text).map_err(|e| toml_error(origin, text, &e, None))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let key = (path != ".").then_some(path);
        toml_error(origin, text, e.inner(), key)
    })
}

/// A parsed config and where it came from, so checks after parsing can point into the text.
#[derive(Debug)]
pub struct Loaded<T> {
    pub config: T,
    /// The file path, or `embedded defaults`.
    pub origin: String,
    /// The file's text (empty for the defaults).
    pub text: String,
}

/// Reads and parses the file at `path`, or takes `T::default()` when there is none.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<Loaded<T>, ConfigError> {
    let Some(path) = path else {
        return Ok(Loaded {
            config: T::default(),
            origin: "embedded defaults".to_owned(),
            text: String::new(),
        });
    };
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::general(&origin, format!("cannot read config file: {e}")))?;
    let config = parse(&origin, &text)?;
    Ok(Loaded {
        config,
        origin,
        text,
    })
}

fn toml_error(origin: &str, text: &str, e: &toml::de::Error, key: Option<String>) -> ConfigError {
    let mut err = ConfigError {
        origin: origin.to_owned(),
        position: None,
        key,
        message: e.message().trim_end().to_owned(),
        source_line: None,
    };
    if let Some(span) = e.span() {
        err.set_position(text, span.start);
    }
    err
}

/// Byte offset of the key (or table header) named by `key_path`, if it is written in `text`.
fn locate_key(text: &str, key_path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found = None;
    let mut rest = key_path;
    while let Some((name, tail)) = rest.split_first() {
        // A key that is not written (a required key left out) points at its parent table.
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *name) else {
            return found;
        };
        found = Some(key.span().start);
        let mut value = value;
        rest = tail;
        // Array of tables: the next path element is the index.
        if let DeValue::Array(items) = value.get_ref()
            && let Some((index, tail)) = rest.split_first()
            && let Ok(i) = index.parse::<usize>()
        {
            value = items.get(i)?;
            found = Some(value.span().start);
            rest = tail;
        }
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ if rest.is_empty() => break,
            _ => return found,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Top {
        #[serde(default)]
        interval_secs: u64,
        #[serde(default)]
        tls: Tls,
        #[serde(default)]
        sinks: Vec<Sink>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Tls {
        ca: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sink {
        #[allow(dead_code)]
        path: String,
    }

    #[test]
    fn unknown_key_names_file_line_key_and_alternatives() {
        let text = "interval_secs = 5\n\n[tls]\ncaa = \"x\"\n";
        let err = parse::<Top>("agent.toml", text).unwrap_err();
        assert_eq!(err.position, Some((4, 1)));
        assert_eq!(err.key.as_deref(), Some("tls.caa"));
        let shown = err.to_string();
        assert!(
            shown.starts_with("agent.toml:4:1: key `tls.caa`: unknown field `caa`, expected `ca`"),
            "{shown}"
        );
        assert!(shown.contains("4 | caa = \"x\""), "{shown}");
    }

    #[test]
    fn wrong_type_names_the_key_and_expectation() {
        let text = "interval_secs = \"ten\"\n";
        let err = parse::<Top>("a.toml", text).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(1));
        assert_eq!(err.key.as_deref(), Some("interval_secs"));
        assert!(err.message.contains("expected u64"), "{}", err.message);
    }

    #[test]
    fn syntax_error_has_a_position() {
        let err = parse::<Top>("a.toml", "interval_secs = \n[tls\n").unwrap_err();
        assert!(err.position.is_some(), "{err}");
    }

    #[test]
    fn at_key_finds_nested_and_array_keys() {
        let text = "interval_secs = 1\n[tls]\nca = \"/x\"\n[[sinks]]\npath = \"a\"\n[[sinks]]\npath = \"b\"\n";
        let err = ConfigError::at_key("a.toml", text, &["tls", "ca"], "no such file");
        assert_eq!(err.position, Some((3, 1)));
        let err = ConfigError::at_key("a.toml", text, &["sinks", "1", "path"], "bad");
        assert_eq!(err.position, Some((7, 1)));
        assert_eq!(err.key.as_deref(), Some("sinks.1.path"));
        let err = ConfigError::at_key("a.toml", text, &["tls", "missing"], "m");
        assert_eq!(err.position, Some((2, 2)));
    }

    #[test]
    fn load_reports_missing_file() {
        let err = load::<Tls>(Some(Path::new("/nonexistent/picket.toml"))).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/picket.toml: cannot read config file")
        );
    }
}
