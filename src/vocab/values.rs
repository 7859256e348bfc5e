//! Small typed values used across the config: durations (`30s`), byte sizes (`1MiB`) and
//! `${ENV_VAR}` interpolation. Parsing them here keeps every other module free of strings.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::Path;

use super::secret::Secret;

/// A duration written as `500ms`, `30s`, `5m`, `1h` (or a bare number of seconds).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub std::time::Duration);

impl fmt::Debug for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(s) => Ok(Self(std::time::Duration::from_secs(s))),
            Raw::Text(t) => humantime::parse_duration(t.trim()).map(Self).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{t}` ({e}); write it like `500ms`, `30s`, `5m` or `1h`"
                ))
            }),
        }
    }
}

/// A size in bytes written as `1048576`, `512KiB`, `1MiB`, `1MB` or `2GiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses the textual form; the error says what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size `{text}`: write it like `1MiB` or `65536`"))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit `{other}` in `{text}`: use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        number
            .checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(b) => Ok(Self(b)),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Where `${VAR}` references are resolved from. Tests pass a map; the binary uses the process
/// environment.
pub trait Environment: Send + Sync {
    /// The value of variable `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Environment for std::collections::HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Replaces every `${NAME}` in `text` by the variable's value; `${NAME:-fallback}` uses
/// `fallback` when the variable is unset or empty. `$$` escapes a literal `$`. The error
/// names the variable, never a value.
pub fn interpolate(text: &str, env: &dyn Environment) -> Result<String, String> {
    interpolate_with_values(text, env).map(|(out, _)| out)
}

/// Like [`interpolate`], also returning the value substituted for each `${…}` (for secret
/// fields: each such value is hidden on its own, as a vendor may echo one part).
pub fn interpolate_with_values(
    text: &str,
    env: &dyn Environment,
) -> Result<(String, Vec<String>), String> {
    let mut values = Vec::new();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated `${` (write `$$` for a literal `$`)".to_string())?;
            let reference = &body[..end];
            let (name, fallback) = match reference.split_once(":-") {
                Some((n, f)) => (n, Some(f)),
                None => (reference, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                // The text between `${` and `}` may be a value typed in the wrong place.
                return Err(
                    "invalid `${…}` reference: a variable name uses letters, digits and `_` \
                     (write `$$` for a literal `$`)"
                        .to_string(),
                );
            }
            let value = match (env.var(name), fallback) {
                (Some(v), Some(f)) if v.is_empty() => f.to_string(),
                (Some(v), _) => v,
                (None, Some(f)) => f.to_string(),
                (None, None) => return Err(format!("environment variable `{name}` is not set")),
            };
            out.push_str(&value);
            values.push(value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok((out, values))
}

/// Reads a secret from a file (trailing newline removed), as mounted by Kubernetes or systemd
/// credentials. Relative paths are relative to the config file's folder.
pub fn read_secret_file(base_dir: &Path, path: &str) -> Result<Secret, String> {
    let full = base_dir.join(path);
    let text = std::fs::read_to_string(&full)
        .map_err(|e| format!("cannot read secret file {}: {e}", full.display()))?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env() -> HashMap<String, String> {
        HashMap::from([("KEY".to_string(), "k1".to_string())])
    }

    #[test]
    fn interpolates_and_escapes() {
        assert_eq!(
            interpolate("a ${KEY}:$$x $y", &env()).as_deref(),
            Ok("a k1:$x $y")
        );
    }

    #[test]
    fn fallbacks_apply_when_unset() {
        assert_eq!(
            interpolate("${KEY:-x}/${NOPE:-dflt}", &env()).as_deref(),
            Ok("k1/dflt")
        );
    }

    #[test]
    fn missing_variable_is_named() {
        let err = interpolate("${NOPE}", &env()).unwrap_err();
        assert!(err.contains("`NOPE`"), "{err}");
    }

    #[test]
    fn unterminated_reference_is_an_error() {
        assert!(interpolate("${KEY", &env()).is_err());
    }

    #[test]
    fn bad_references_never_print_their_text() {
        for text in ["Outseta ${my key:secret}", "${pass word}", "x ${hunter2"] {
            let err = interpolate(text, &env()).unwrap_err();
            assert!(
                !err.contains("key:secret") && !err.contains("pass word"),
                "{err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("1MiB"), Ok(ByteSize(1 << 20)));
        assert_eq!(ByteSize::parse("65536"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("2 KB"), Ok(ByteSize(2000)));
        assert!(ByteSize::parse("1XB").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }
}
