//! Secrets in config files (passwords, tokens): written inline, read from a file, or taken
//! from an environment variable, exactly one of the three.
//!
//! Files suit systemd credentials (`LoadCredential=`) and mounted Kubernetes secrets;
//! variables suit containers. A file's first line is the secret (a trailing newline from an
//! editor is not part of it). The value never appears in an error message.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("set only one of {key}, {key}_file and {key}_env")]
    Ambiguous { key: String },
    #[error("cannot read {key}_file {path}: {reason}")]
    File {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}_env names {variable}, which is not set (or not UTF-8) in the environment")]
    MissingVariable { key: String, variable: String },
    #[error("{key} is empty")]
    Empty { key: String },
}

/// Where a config says a secret is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecretSource<'a> {
    pub inline: Option<&'a str>,
    pub file: Option<&'a Path>,
    pub env: Option<&'a str>,
}

impl SecretSource<'_> {
    pub fn is_set(&self) -> bool {
        self.inline.is_some() || self.file.is_some() || self.env.is_some()
    }

    /// The secret, `None` when none of the three is set. `key` names the config key in errors
    /// (`password`, `bearer_token`, ...).
    pub fn resolve(&self, key: &str) -> Result<Option<String>, SecretError> {
        let set = [
            self.inline.is_some(),
            self.file.is_some(),
            self.env.is_some(),
        ];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err(SecretError::Ambiguous { key: key.into() });
        }
        let value = if let Some(inline) = self.inline {
            inline.to_owned()
        } else if let Some(path) = self.file {
            let text = std::fs::read_to_string(path).map_err(|e| SecretError::File {
                key: key.into(),
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            text.lines().next().unwrap_or_default().to_owned()
        } else if let Some(variable) = self.env {
            std::env::var(variable).map_err(|_| SecretError::MissingVariable {
                key: key.into(),
                variable: variable.into(),
            })?
        } else {
            return Ok(None);
        };
        if value.is_empty() {
            return Err(SecretError::Empty { key: key.into() });
        }
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_file_and_environment() {
        let dir = std::env::temp_dir().join(format!("picket-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let from_file = SecretSource {
            file: Some(&file),
            ..Default::default()
        };
        assert_eq!(from_file.resolve("token"), Ok(Some("s3cret".into())));
        // PATH is set in every test environment; its value stands in for a secret.
        let from_env = SecretSource {
            env: Some("PATH"),
            ..Default::default()
        };
        assert_eq!(
            from_env.resolve("token").ok().flatten(),
            std::env::var("PATH").ok()
        );
        let inline = SecretSource {
            inline: Some("x"),
            ..Default::default()
        };
        assert_eq!(inline.resolve("token"), Ok(Some("x".into())));
        assert_eq!(SecretSource::default().resolve("token"), Ok(None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_key_never_the_value() {
        let both = SecretSource {
            inline: Some("hunter2"),
            env: Some("PATH"),
            ..Default::default()
        };
        let e = both.resolve("password").unwrap_err().to_string();
        assert!(e.contains("password_env") && !e.contains("hunter2"), "{e}");
        let missing = SecretSource {
            env: Some("PICKET_TEST_SURELY_UNSET_VARIABLE"),
            ..Default::default()
        };
        assert!(matches!(
            missing.resolve("token"),
            Err(SecretError::MissingVariable { .. })
        ));
        let nowhere = SecretSource {
            file: Some(Path::new("/nonexistent/picket/secret")),
            ..Default::default()
        };
        let e = nowhere.resolve("token").unwrap_err().to_string();
        assert!(e.contains("token_file /nonexistent/picket/secret"), "{e}");
        let empty = SecretSource {
            inline: Some(""),
            ..Default::default()
        };
        assert_eq!(
            empty.resolve("password"),
            Err(SecretError::Empty {
                key: "password".into()
            })
        );
    }
}
