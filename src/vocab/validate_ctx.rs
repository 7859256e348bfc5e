//! What validating a config section needs: `${VAR}` resolution, `*_file` secrets relative to
//! the config file, and one list collecting every problem (so a user fixes a file in one
//! pass). Every credential type and the config validator write their checks against it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;

use super::hop_by_hop::is_hop_by_hop;
use super::secret::Secret;
use super::secret_command;
use super::values::{interpolate, interpolate_with_values, read_secret_file, Environment};

/// What a credential's validation needs: the environment for `${VAR}`, the config file's
/// folder for relative `*_file` paths, and a list to record problems in.
pub struct ValidateCtx<'a> {
    env: &'a dyn Environment,
    base_dir: PathBuf,
    problems: Vec<String>,
    scope: String,
    /// Every file read for the config (secrets, keys, CAs): watched for rotation.
    files: Vec<PathBuf>,
    /// The `${VAR}` values used in secret fields of the credential being validated.
    secret_parts: Vec<Secret>,
    /// `x_command` argv by secret field `x`, offered for the section being validated.
    commands: BTreeMap<String, Vec<String>>,
    /// How long one secret command may run.
    command_timeout: Duration,
    /// Whether any secret came from a command (a refused secret then re-runs them).
    ran_commands: bool,
}

impl<'a> ValidateCtx<'a> {
    /// A context that resolves variables from `env` and files relative to `base_dir`.
    pub fn new(env: &'a dyn Environment, base_dir: PathBuf) -> Self {
        Self {
            env,
            base_dir,
            problems: Vec::new(),
            scope: String::new(),
            files: Vec::new(),
            secret_parts: Vec::new(),
            commands: BTreeMap::new(),
            command_timeout: secret_command::DEFAULT_TIMEOUT,
            ran_commands: false,
        }
    }

    /// Sets the prefix (`credentials.NAME`, `routes[3] (NAME)`) that problems are reported under.
    pub fn scope(&mut self, scope: impl Into<String>) {
        self.scope = scope.into();
    }

    /// Records a problem with `field` of the current scope.
    pub fn problem(&mut self, field: &str, message: impl std::fmt::Display) {
        let where_ = match (self.scope.is_empty(), field.is_empty()) {
            (true, _) => field.to_string(),
            (false, true) => self.scope.clone(),
            (false, false) => format!("{}.{field}", self.scope),
        };
        self.problems.push(format!("{where_}: {message}"));
    }

    /// The problems found so far.
    pub fn into_problems(self) -> Vec<String> {
        self.problems
    }

    /// Resolves `${VAR}` in a plain (non-secret) value.
    pub fn text(&mut self, field: &str, raw: &str) -> Option<String> {
        match interpolate(raw, self.env) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(field, e);
                None
            }
        }
    }

    /// Resolves a required plain value.
    pub fn required_text(&mut self, field: &str, raw: Option<&str>) -> Option<String> {
        match raw {
            Some(r) => self.text(field, r),
            None => {
                self.problem(field, "is required");
                None
            }
        }
    }

    /// How long each secret command may run (`secret_command_timeout`).
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Makes `argv` the `field_command` of the next read of secret `field`.
    pub fn offer_command(&mut self, field: &str, argv: Vec<String>) {
        self.commands.insert(field.to_string(), argv);
    }

    /// The secret fields whose `_command` was offered but never read (the section has no
    /// such secret), forgotten.
    pub fn take_unused_commands(&mut self) -> Vec<String> {
        std::mem::take(&mut self.commands).into_keys().collect()
    }

    /// Whether any secret was read from a command.
    pub fn ran_commands(&self) -> bool {
        self.ran_commands
    }

    /// Resolves a secret given inline (`field`, with `${VAR}`), as a file (`field_file`) or
    /// as a command (`field_command`, offered with [`Self::offer_command`]). At most one may
    /// be set; `None` with no problem when none is.
    pub fn optional_secret(
        &mut self,
        field: &str,
        inline: Option<&str>,
        file: Option<&str>,
    ) -> Option<Secret> {
        let command = self.commands.remove(field);
        match (inline, file, command) {
            (None, None, Some(argv)) => {
                self.ran_commands = true;
                match secret_command::run(&argv, &self.base_dir, self.command_timeout) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        self.problem(&format!("{field}_command"), e);
                        None
                    }
                }
            }
            (_, _, Some(_)) => {
                self.problem(
                    field,
                    format!("set only one of `{field}`, `{field}_file` or `{field}_command`"),
                );
                None
            }
            (Some(_), Some(_), None) => {
                self.problem(
                    field,
                    format!("set either `{field}` or `{field}_file`, not both"),
                );
                None
            }
            (Some(raw), None, None) => match interpolate_with_values(raw, self.env) {
                Ok((value, parts)) => {
                    self.secret_parts.extend(parts.into_iter().map(Secret::new));
                    Some(Secret::new(value))
                }
                Err(e) => {
                    self.problem(field, e);
                    None
                }
            },
            (None, Some(path), None) => {
                let path = self.text(&format!("{field}_file"), path)?;
                self.files.push(self.base_dir.join(&path));
                match read_secret_file(&self.base_dir, &path) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        self.problem(&format!("{field}_file"), e);
                        None
                    }
                }
            }
            (None, None, None) => None,
        }
    }

    /// Like [`Self::optional_secret`] but one of the three forms must be present.
    pub fn required_secret(
        &mut self,
        field: &str,
        inline: Option<&str>,
        file: Option<&str>,
    ) -> Option<Secret> {
        if inline.is_none() && file.is_none() && !self.commands.contains_key(field) {
            self.problem(
                field,
                format!(
                    "is required (inline with ${{VAR}}, as `{field}_file` or `{field}_command`)"
                ),
            );
            return None;
        }
        self.optional_secret(field, inline, file)
    }

    /// An absolute http(s) URL.
    pub fn url(&mut self, field: &str, raw: &str) -> Option<reqwest::Url> {
        let text = self.text(field, raw)?;
        match reqwest::Url::parse(&text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            Ok(_) => {
                self.problem(
                    field,
                    format!("`{text}` must be an http:// or https:// URL"),
                );
                None
            }
            Err(e) => {
                self.problem(field, format!("`{text}` is not a valid URL: {e}"));
                None
            }
        }
    }

    /// A header name (default `Authorization`).
    pub fn header_name(&mut self, field: &str, raw: Option<&str>) -> Option<HeaderName> {
        let raw = raw.unwrap_or("Authorization");
        match HeaderName::from_bytes(raw.as_bytes()) {
            Ok(h) if is_hop_by_hop(&h) => {
                self.problem(
                    field,
                    format!("`{raw}` is a hop-by-hop header and cannot carry a credential"),
                );
                None
            }
            Ok(h) => Some(h),
            Err(_) => {
                self.problem(field, format!("`{raw}` is not a valid header name"));
                None
            }
        }
    }

    /// A path to a file that must exist, relative to the config file's folder.
    pub fn existing_file(&mut self, field: &str, raw: &str) -> Option<PathBuf> {
        let text = self.text(field, raw)?;
        let path = self.base_dir.join(text);
        self.files.push(path.clone());
        if path.is_file() {
            Some(path)
        } else {
            self.problem(field, format!("file {} does not exist", path.display()));
            None
        }
    }

    /// The config file's folder.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The secret values resolved since the last call (for one credential's redactor).
    pub fn take_secret_parts(&mut self) -> Vec<Secret> {
        std::mem::take(&mut self.secret_parts)
    }

    /// Every file read so far (secrets, keys, CAs), for the reloader to watch.
    pub fn take_files(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.files)
    }
}
