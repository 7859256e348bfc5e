//! Credentials: where the value of an injected header comes from. One file per token source;
//! each turns its config section into settings (`validate`) and its settings into a
//! [`TokenSource`]. Timing, caching, single flight and backoff are not here: they are shared
//! by every source in `token_store/`.

pub mod consent;
pub mod exchange;
pub mod fingerprint;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, Method};

use crate::vocab::redact::Redactor;
use crate::vocab::secret::Secret;
use crate::vocab::secret_command::ArgvSummary;
use crate::vocab::validate_ctx::ValidateCtx;
pub use fingerprint::Fingerprint;

/// A freshly obtained credential.
#[derive(Debug, Clone)]
pub struct Token {
    /// The complete header value, scheme included (`Bearer eyJ…`, `Outseta key:secret`).
    pub value: Secret,
    /// When the token stops being accepted; `None` for values that never expire.
    pub expires_at: Option<SystemTime>,
    /// A grant that can get the next token without the primary secret (refresh tokens).
    pub refresh: Option<RefreshGrant>,
}

impl Token {
    /// `base` plus this token's header value, the bare token after its scheme, and its
    /// refresh grant: the tokens a source holds while it fetches the next one.
    pub fn redactor(&self, base: &Redactor) -> Redactor {
        let token = self;
        let value = token.value.expose();
        let bare = value.split_once(' ').map(|(_, t)| t);
        let refresh = token.refresh.as_ref().map(|g| g.token.expose());
        base.with([Some(value), bare, refresh].into_iter().flatten())
    }
}

/// A refresh token and its own expiry.
#[derive(Debug, Clone)]
pub struct RefreshGrant {
    pub token: Secret,
    pub expires_at: Option<SystemTime>,
}

impl RefreshGrant {
    /// Whether the grant can still be used at `now`.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// Why a token could not be obtained. Messages never contain a secret: transport errors are
/// stripped of their URL (a query could carry a client secret) and only vendor message fields
/// of error bodies are kept.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The token endpoint could not be reached or did not answer in time.
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    /// The token endpoint answered with an error status.
    #[error("token endpoint answered {status}{}", detail_suffix(detail))]
    Rejected { status: u16, detail: String },
    /// The token endpoint refused the configured secret or grant (RFC 6749 §5.2
    /// `invalid_client`, `invalid_grant`, `unauthorized_client`, or any 400/401): retrying
    /// will not help until the configuration changes. `vendor_error` is the vendor's `error`
    /// code when it sent a registered one.
    #[error("token endpoint refused the credential ({status}{}){}", code_suffix(vendor_error.as_deref()), detail_suffix(detail))]
    Refused {
        status: u16,
        vendor_error: Option<String>,
        detail: String,
    },
    /// The answer was not the document the vendor documents.
    #[error("token endpoint answer not understood: {0}")]
    BadResponse(String),
    /// A person has to consent (again) before tokens can be had: none are stored yet, or
    /// the vendor refused the stored refresh token (`invalid_grant`: revoked, or expired).
    /// Only `authrelay authorize` cures it, so it is final and the slot calls no endpoint
    /// until then.
    #[error("consent required: {0}")]
    ConsentRequired(String),
    /// Anything else (an unreadable key, an account that does not exist, …).
    #[error("{0}")]
    Other(String),
}

impl CredentialError {
    /// The same error with every text in it passed through [`Redactor::detail`].
    pub fn redacted(self, redactor: &Redactor) -> Self {
        match self {
            CredentialError::Unreachable(m) => CredentialError::Unreachable(redactor.detail(&m)),
            CredentialError::Rejected { status, detail } => CredentialError::Rejected {
                status,
                detail: redactor.detail(&detail),
            },
            CredentialError::Refused {
                status,
                vendor_error,
                detail,
            } => CredentialError::Refused {
                status,
                vendor_error,
                detail: redactor.detail(&detail),
            },
            CredentialError::BadResponse(m) => CredentialError::BadResponse(redactor.detail(&m)),
            CredentialError::ConsentRequired(m) => {
                CredentialError::ConsentRequired(redactor.detail(&m))
            }
            CredentialError::Other(m) => CredentialError::Other(redactor.detail(&m)),
        }
    }

    /// Whether the endpoint refused the grant that was presented (a refresh token, a cached
    /// access token) rather than being in trouble: the caller should fall back to the
    /// primary secret instead of backing off. `success: false` answers come as `Rejected`
    /// with a 2xx status.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CredentialError::Refused { .. })
            || matches!(self, CredentialError::Rejected { status, .. }
            if matches!(status, 400 | 401 | 403) || (200..300).contains(status))
    }

    /// Whether the failure is final: the token endpoint refused the configured secret, so the
    /// slot backs off straight to `backoff_max` and reports the credential as `rejected`.
    /// Outages (5xx, timeouts, connection errors) are not final.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            CredentialError::Refused { .. } | CredentialError::ConsentRequired(_)
        )
    }

    /// Whether only a person's consent (`authrelay authorize`) can cure the failure.
    pub fn needs_consent(&self) -> bool {
        matches!(self, CredentialError::ConsentRequired(_))
    }

    /// The vendor's RFC 6749 `error` code of a refusal (`invalid_client`, …), if it sent one.
    pub fn vendor_error(&self) -> Option<&str> {
        match self {
            CredentialError::Refused { vendor_error, .. } => vendor_error.as_deref(),
            _ => None,
        }
    }
}

fn code_suffix(code: Option<&str>) -> String {
    code.map(|c| format!(" {c}")).unwrap_or_default()
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// A boxed future returned by [`TokenSource::fetch`] (trait objects cannot use `async fn`).
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Token, CredentialError>> + Send + 'a>>;

/// Something that can obtain a token. Implementations hold their settings and an HTTP client;
/// they never cache tokens — the token store decides when to call them — though one may
/// remember a lookup that does not change between tokens (the Outseta subscription of an
/// account).
pub trait TokenSource: Send + Sync + 'static {
    /// Obtains a new token. `previous` is the last token this source issued, so that a
    /// source with refresh tokens can use its grant (and fall back to a full login when the
    /// grant is refused or expired).
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a>;

    /// Whether fetching again can cure a 401/403 (false for values fixed in the config).
    fn refreshable(&self) -> bool {
        true
    }

    /// The upstream refused what this source's fixed value (or signature) was made from:
    /// whoever holds the config may read secrets that come from commands again.
    fn value_refused(&self) {}

    /// The longest this source's grant may go unused, traffic or not (a refresh token the
    /// vendor expires when idle); `None` when only traffic decides.
    fn keepalive(&self) -> Option<std::time::Duration> {
        None
    }
}

/// One credential type: the `type:` name YAML selects it by, its own fields, how they are
/// checked, and the token source they make. Adding a type is one new file with an
/// implementation of this trait, plus one line in the [`credential_types!`] list below; YAML
/// reaches a type only through that list. `header`, `scheme` and `prefetch` are read once for
/// every type ([`CommonSpec`]).
///
/// A whole new type, as `src/credentials/greeting.rs` would hold it (this example is compiled
/// and run by `cargo test`); registering it is the line `greeting::Greeting,`:
///
/// ```
/// use std::sync::Arc;
///
/// use authrelay::credentials::{
///     CredentialType, FetchFuture, Fingerprint, SourceDeps, Token, TokenFormat, TokenSource,
/// };
/// use authrelay::vocab::secret::Secret;
/// use authrelay::vocab::validate_ctx::ValidateCtx;
///
/// /// `type: greeting` — a fixed token, sent with the configured scheme.
/// pub struct Greeting;
///
/// #[derive(Debug, serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// pub struct GreetingSpec {
///     token: Option<Secret>,
/// }
///
/// #[derive(Debug, Clone, PartialEq)]
/// pub struct GreetingSettings {
///     value: Secret,
/// }
///
/// impl CredentialType for Greeting {
///     const NAME: &'static str = "greeting";
///     type Spec = GreetingSpec;
///     type Settings = GreetingSettings;
///
///     fn default_scheme(_: &GreetingSpec) -> Option<&'static str> {
///         Some("Bearer")
///     }
///
///     fn validate(
///         spec: GreetingSpec,
///         format: TokenFormat,
///         ctx: &mut ValidateCtx<'_>,
///     ) -> Option<GreetingSettings> {
///         let token = ctx.required_secret("token", spec.token.as_ref().map(Secret::expose), None)?;
///         Some(GreetingSettings { value: format.header_value(token.expose()) })
///     }
///
///     fn fingerprint(settings: &GreetingSettings, fp: &mut Fingerprint) {
///         fp.secret("value", &settings.value);
///     }
///
///     fn source(settings: &GreetingSettings, _deps: &SourceDeps) -> Arc<dyn TokenSource> {
///         Arc::new(Fixed(settings.value.clone()))
///     }
/// }
///
/// struct Fixed(Secret);
///
/// impl TokenSource for Fixed {
///     fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
///         let token = Token { value: self.0.clone(), expires_at: None, refresh: None };
///         Box::pin(async move { Ok(token) })
///     }
///
///     fn refreshable(&self) -> bool {
///         false
///     }
/// }
///
/// // What the registry does with it: read the section, validate it, build the source.
/// let env = std::collections::HashMap::<String, String>::new();
/// let mut ctx = ValidateCtx::new(&env, std::env::temp_dir());
/// let spec: GreetingSpec = serde_yaml::from_str("token: hello").unwrap();
/// let format = TokenFormat::new(None, "Bearer");
/// let settings = Greeting::validate(spec, format, &mut ctx).unwrap();
/// assert_eq!(settings.value.expose(), "Bearer hello");
/// assert_eq!(format!("{settings:?}"), "GreetingSettings { value: *** }");
/// ```
pub trait CredentialType: 'static {
    /// The `type:` value in the config.
    const NAME: &'static str;
    /// Whether `prefetch: true` applies (false for values that are never fetched).
    const PREFETCH: bool = true;
    /// The type's own fields as written (serde, `deny_unknown_fields`; secrets as `Secret`).
    type Spec: serde::de::DeserializeOwned;
    /// The validated settings. Compared on reload: a credential whose settings are unchanged
    /// keeps its cached token. `Debug` must not show a secret (hold them as `Secret`).
    type Settings: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static;

    /// The scheme written before the token when `scheme` is not set; `None` when the type
    /// takes no `scheme` (its value is the whole header, as with `static`).
    fn default_scheme(spec: &Self::Spec) -> Option<&'static str>;

    /// Checks the type's own fields; problems go to `ctx`. `format` is the validated scheme.
    fn validate(
        spec: Self::Spec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<Self::Settings>;

    /// Writes what identifies these settings (every field that decides which token they
    /// get, secrets through [`Fingerprint::secret`]; not timing) into `fp`: replicas share
    /// tokens only between equal fingerprints. Required, so that a new type must say it.
    fn fingerprint(settings: &Self::Settings, fp: &mut Fingerprint);

    /// The runtime source for validated settings.
    fn source(settings: &Self::Settings, deps: &SourceDeps) -> Arc<dyn TokenSource>;

    /// For types that sign each request instead of sending a token (`hmac`, `aws_sigv4`):
    /// the signer. Their [`TokenSource`] is [`NoToken`].
    fn signer(_settings: &Self::Settings) -> Option<&dyn RequestSigner> {
        None
    }
}

/// A request about to go upstream, as a signer sees it.
pub struct SigningRequest<'a> {
    pub method: &'a Method,
    /// The `Host` the upstream receives (no default port).
    pub host: &'a str,
    /// The path as sent (percent-encoded), never empty.
    pub path: &'a str,
    /// The query as sent, without `?` (empty when none).
    pub query: &'a str,
    /// The request's headers; the signer adds its own.
    pub headers: &'a mut HeaderMap,
    /// The whole body, when [`RequestSigner::signs_body`] says the signature covers it.
    pub body: Option<&'a [u8]>,
    pub now: SystemTime,
}

/// Signs one attempt of a request: every send (a replay included) is signed afresh, with
/// its own timestamp and nonce.
pub trait RequestSigner: Send + Sync {
    /// Whether the signature covers the body: then the body is read whole before the head
    /// goes out (within `retry.max_body_bytes`); otherwise it streams.
    fn signs_body(&self) -> bool;

    /// Adds the signature, in `header` (the credential's shared `header` field), and
    /// whatever else it needs (a timestamp header) to `request.headers`. The error names what
    /// is missing, never a secret.
    fn sign(&self, header: &HeaderName, request: SigningRequest<'_>) -> Result<(), String>;
}

/// The token source of a type that signs requests: there is no token to fetch, so a fetch
/// (an operator's refresh on the admin endpoint) says so.
pub struct NoToken(pub &'static str);

impl TokenSource for NoToken {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        let message = format!("`type: {}` signs each request; it has no token", self.0);
        Box::pin(async move { Err(CredentialError::Other(message)) })
    }

    fn refreshable(&self) -> bool {
        false
    }
}

/// The fields every credential type shares, as written. `Debug` by hand: a command's
/// arguments may carry a token.
#[derive(Default)]
pub struct CommonSpec {
    /// Header to set (default `Authorization`).
    pub header: Option<String>,
    /// The word before the token (`""` sends the bare token); default per type.
    pub scheme: Option<String>,
    /// Fetch a token at start and keep it fresh in the background.
    pub prefetch: Option<bool>,
    /// Send the value in this query parameter instead of a header.
    pub query_param: Option<String>,
    /// `x_command` argv by secret field `x`: run to obtain that secret.
    pub commands: Vec<(String, Vec<String>)>,
}

impl std::fmt::Debug for CommonSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let commands: Vec<(&str, ArgvSummary<'_>)> = self
            .commands
            .iter()
            .map(|(field, argv)| (field.as_str(), ArgvSummary(argv)))
            .collect();
        f.debug_struct("CommonSpec")
            .field("header", &self.header)
            .field("scheme", &self.scheme)
            .field("prefetch", &self.prefetch)
            .field("query_param", &self.query_param)
            .field("commands", &commands)
            .finish()
    }
}

/// The validated settings of one credential, of whichever type. Compared on reload.
#[derive(Clone)]
pub struct CredentialKind(Arc<dyn Definition>);

impl CredentialKind {
    /// The type name as written in the config, for logs and the admin endpoint.
    pub fn type_name(&self) -> &'static str {
        self.0.type_name()
    }

    /// Writes the type's fields into `fp` (see [`CredentialType::fingerprint`]).
    pub fn fingerprint(&self, fp: &mut Fingerprint) {
        self.0.fingerprint(fp);
    }

    /// The signer of a type that signs each request (`None` for token types).
    pub fn signer(&self) -> Option<&dyn RequestSigner> {
        self.0.signer()
    }

    /// The settings, when they are of type `T` (for tests and embedders).
    pub fn settings<T: CredentialType>(&self) -> Option<&T::Settings> {
        self.0
            .as_any()
            .downcast_ref::<Defined<T>>()
            .map(|d| &d.settings)
    }
}

impl PartialEq for CredentialKind {
    fn eq(&self, other: &Self) -> bool {
        self.0.same(other.0.as_ref())
    }
}

impl std::fmt::Debug for CredentialKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt_settings(f)
    }
}

/// Object-safe face of a type's settings.
trait Definition: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn source(&self, deps: &SourceDeps) -> Arc<dyn TokenSource>;
    fn signer(&self) -> Option<&dyn RequestSigner>;
    fn as_any(&self) -> &dyn std::any::Any;
    fn same(&self, other: &dyn Definition) -> bool;
    fn fmt_settings(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result;
    fn fingerprint(&self, fp: &mut Fingerprint);
}

struct Defined<T: CredentialType> {
    settings: T::Settings,
}

impl<T: CredentialType> Definition for Defined<T> {
    fn type_name(&self) -> &'static str {
        T::NAME
    }

    fn source(&self, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        T::source(&self.settings, deps)
    }

    fn signer(&self) -> Option<&dyn RequestSigner> {
        T::signer(&self.settings)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn same(&self, other: &dyn Definition) -> bool {
        other
            .as_any()
            .downcast_ref::<Self>()
            .is_some_and(|o| o.settings == self.settings)
    }

    fn fmt_settings(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.settings, f)
    }

    fn fingerprint(&self, fp: &mut Fingerprint) {
        T::fingerprint(&self.settings, fp);
    }
}

/// What validating one credential section gives.
#[derive(Debug)]
pub struct ValidatedCredential {
    pub header: HeaderName,
    /// The query parameter the value goes in instead of `header`.
    pub query_param: Option<String>,
    pub prefetch: bool,
    pub kind: CredentialKind,
}

/// Shared things a source needs at run time.
#[derive(Clone)]
pub struct SourceDeps {
    /// The client for token endpoints (rustls, same trust roots as upstream requests).
    pub http: reqwest::Client,
    /// Woken when the vendor refuses a configured secret (a token endpoint for good, or the
    /// upstream a fixed value or a signature): whoever holds the config re-reads secrets
    /// that come from commands (a rotated one is then used).
    pub secret_refused: Arc<tokio::sync::Notify>,
    /// Where tokens a person consented to outlive the process (`token_cache: type: file`).
    pub durable: Option<Arc<dyn DurableTokens>>,
    /// The name of the credential the source is built for (empty until
    /// [`SourceDeps::for_credential`]): durable records are kept under it.
    pub credential: Arc<str>,
}

impl SourceDeps {
    /// Dependencies with only the token endpoint client.
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            secret_refused: Arc::default(),
            durable: None,
            credential: Arc::from(""),
        }
    }

    /// The same dependencies for credential `name`.
    pub fn for_credential(&self, name: &str) -> Self {
        Self {
            credential: Arc::from(name),
            ..self.clone()
        }
    }
}

/// A store that keeps tokens across restarts, for credentials whose refresh token cannot be
/// had again without a person. Calls block (file I/O, fsync): run them off the runtime.
/// `identity` binds a record to the credential's definition, so that tokens issued to
/// another client or token endpoint are never sent.
pub trait DurableTokens: Send + Sync + 'static {
    /// The stored token of `credential`, if any (a record sealed for another identity or
    /// key reads as none).
    fn load(&self, credential: &str, identity: &str) -> Result<Option<Token>, String>;
    /// Replaces the stored token of `credential`; durable once this returns.
    fn save(&self, credential: &str, identity: &str, token: &Token) -> Result<(), String>;
    /// Forgets `credential`'s token; whether there was one.
    fn delete(&self, credential: &str) -> Result<bool, String>;
    /// Waits until no other holder (another process sharing the store included) is
    /// refreshing, and keeps them out until the guard is dropped: a single-use refresh token
    /// is read and spent under it, so it is never sent twice.
    fn lock_refresh(&self) -> Result<RefreshLock, String>;
}

/// Held while a refresh token is read, spent and its successor written; dropping it lets
/// the next refresher in.
pub struct RefreshLock(pub Box<dyn Send>);

/// Builds the runtime source of a validated credential, wrapped so that its errors also hide
/// each `${VAR}` value used in its secret fields. (A panic inside a fetch is turned into an
/// ordinary failure by the token store, which runs every fetch in a task of its own.)
pub fn build_credential_source(
    kind: &CredentialKind,
    secret_parts: &[Secret],
    deps: &SourceDeps,
) -> Arc<dyn TokenSource> {
    Arc::new(Redacting {
        inner: kind.0.source(deps),
        redactor: Redactor::new(secret_parts.iter().map(Secret::expose)),
        secret_refused: Arc::clone(&deps.secret_refused),
    })
}

/// Validation of one section, its type-specific fields already read.
type PendingValidation =
    Box<dyn FnOnce(&CommonSpec, &mut ValidateCtx<'_>) -> Option<ValidatedCredential>>;

/// A credential section whose type-specific fields have been read and await validation.
pub struct ParsedCredential {
    type_name: &'static str,
    common: CommonSpec,
    validate: PendingValidation,
}

impl std::fmt::Debug for ParsedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedCredential")
            .field("type", &self.type_name)
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl ParsedCredential {
    /// Checks the section (shared fields, then the type's own); problems go to `ctx`.
    pub fn validate(self, ctx: &mut ValidateCtx<'_>) -> Option<ValidatedCredential> {
        (self.validate)(&self.common, ctx)
    }
}

/// One entry of the registry: a type's name and how to read its section.
struct Registration {
    name: &'static str,
    parse: fn(serde_yaml::Mapping, CommonSpec) -> Result<ParsedCredential, serde_yaml::Error>,
}

const fn register<T: CredentialType>() -> Registration {
    Registration {
        name: T::NAME,
        parse: parse_section::<T>,
    }
}

fn parse_section<T: CredentialType>(
    fields: serde_yaml::Mapping,
    common: CommonSpec,
) -> Result<ParsedCredential, serde_yaml::Error> {
    let spec: T::Spec = serde_yaml::from_value(serde_yaml::Value::Mapping(fields))?;
    Ok(ParsedCredential {
        type_name: T::NAME,
        common,
        validate: Box::new(move |common, ctx| validate_section::<T>(spec, common, ctx)),
    })
}

/// The shared fields, checked once for every type, then the type's own.
fn validate_section<T: CredentialType>(
    spec: T::Spec,
    common: &CommonSpec,
    ctx: &mut ValidateCtx<'_>,
) -> Option<ValidatedCredential> {
    let header = ctx.header_name("header", common.header.as_deref());
    let query_param = common.query_param.as_deref().and_then(|name| {
        query_param_name(ctx, name, common.header.is_some()).then(|| name.to_string())
    });
    let format = match (T::default_scheme(&spec), common.scheme.as_deref()) {
        (None, Some(_)) => {
            ctx.problem(
                "scheme",
                format!(
                    "does not apply to `type: {}`: its value is the whole header",
                    T::NAME
                ),
            );
            None
        }
        (None, None) => Some(TokenFormat::new(None, "")),
        // In a query string the bare token is what APIs expect (`?api_key=…`).
        (Some(_), scheme) if common.query_param.is_some() => scheme_format(ctx, scheme, ""),
        (Some(default), scheme) => scheme_format(ctx, scheme, default),
    };
    let prefetch = common.prefetch.unwrap_or(false);
    if prefetch && !T::PREFETCH {
        ctx.problem(
            "prefetch",
            format!("does not apply to `type: {}`: it is never fetched", T::NAME),
        );
    }
    let format = format?;
    for (field, argv) in &common.commands {
        ctx.offer_command(field, argv.clone());
    }
    let settings = T::validate(spec, format, ctx);
    // A section that failed may have stopped before reading a secret: only a valid one
    // proves that a command names no secret of its type.
    let unused = ctx.take_unused_commands();
    for field in unused.iter().filter(|_| settings.is_some()) {
        ctx.problem(
            &format!("{field}_command"),
            format!(
                "`type: {}` has no secret `{field}` to read from a command",
                T::NAME
            ),
        );
    }
    let settings = settings?;
    if common.query_param.is_some() && T::signer(&settings).is_some() {
        ctx.problem(
            "query_param",
            format!(
                "does not apply to `type: {}`: it signs each request and has no value to send",
                T::NAME
            ),
        );
        return None;
    }
    Some(ValidatedCredential {
        header: header?,
        query_param,
        prefetch,
        kind: CredentialKind(Arc::new(Defined::<T> { settings })),
    })
}

/// Whether `name` can be a `query_param`: a plain parameter name (so that it never needs
/// encoding and compares as written), and not together with `header`.
fn query_param_name(ctx: &mut ValidateCtx<'_>, name: &str, header_set: bool) -> bool {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.~".contains(c));
    if !plain {
        ctx.problem(
            "query_param",
            "must be a parameter name of letters, digits, `_`, `-`, `.` and `~`",
        );
    }
    if header_set {
        ctx.problem(
            "header",
            "does not apply with `query_param`: the value goes in the query string instead",
        );
    }
    plain && !header_set
}

/// Declares the credential modules and the registry YAML reaches them through: one line per
/// type, `module::Type`.
macro_rules! credential_types {
    ($($module:ident :: $ty:ident),+ $(,)?) => {
        $(pub mod $module;)+
        static REGISTRY: &[Registration] = &[$(register::<$module::$ty>()),+];
    };
}

credential_types! {
    static_header::StaticHeader,
    oauth2::OAuth2ClientCredentials,
    outreach::OutreachS2s,
    jwt::AppJwt,
    outseta::Outseta,
    login::Login,
    oauth2_code::OAuth2AuthorizationCode,
    oauth2_device::OAuth2DeviceCode,
    hmac::HmacSignature,
    aws_sigv4::AwsSigV4,
    basic::Basic,
}

/// Whether `type_name` is a type a person consents to (`authrelay authorize`): its refresh
/// token lives in the durable store.
pub fn is_consent_type(type_name: &str) -> bool {
    type_name == oauth2_code::OAuth2AuthorizationCode::NAME
        || type_name == oauth2_device::OAuth2DeviceCode::NAME
}

/// Every `type:` name YAML accepts, in registry order.
pub fn type_names() -> Vec<&'static str> {
    REGISTRY.iter().map(|r| r.name).collect()
}

/// Reads one credential section (a YAML mapping with `type:`): the shared fields once, the
/// rest by the registered type.
pub fn parse_credential(mut fields: serde_yaml::Mapping) -> Result<ParsedCredential, String> {
    let type_name = match fields.remove("type") {
        Some(serde_yaml::Value::String(t)) => t,
        Some(_) => return Err("`type` must be a string".into()),
        None => {
            return Err(format!(
                "missing field `type` (one of {})",
                quoted(&type_names())
            ))
        }
    };
    let registration = REGISTRY
        .iter()
        .find(|r| r.name == type_name)
        .ok_or_else(|| {
            format!(
                "type: unknown variant `{type_name}`, expected one of {}",
                quoted(&type_names())
            )
        })?;
    let common = CommonSpec {
        header: take_string(&mut fields, "header")?,
        scheme: take_string(&mut fields, "scheme")?,
        prefetch: match fields.remove("prefetch") {
            None => None,
            Some(serde_yaml::Value::Bool(b)) => Some(b),
            Some(_) => return Err("prefetch: expected true or false".into()),
        },
        query_param: take_string(&mut fields, "query_param")?,
        commands: take_commands(&mut fields)?,
    };
    (registration.parse)(fields, common).map_err(|e| {
        let text = e.to_string();
        if text.contains("unknown field") {
            format!("{text} (or the shared `header`, `scheme`, `prefetch`, `query_param`)")
        } else {
            text
        }
    })
}

/// Removes every `x_command` key: the registry runs them for the type, which only ever sees
/// secret `x` (see `ValidateCtx::offer_command`).
fn take_commands(fields: &mut serde_yaml::Mapping) -> Result<Vec<(String, Vec<String>)>, String> {
    let keys: Vec<String> = fields
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| k.ends_with("_command"))
        .map(String::from)
        .collect();
    let mut commands = Vec::new();
    for key in keys {
        let value = fields.remove(key.as_str());
        let argv: Option<Vec<String>> = value
            .and_then(|v| serde_yaml::from_value(v).ok())
            .filter(|argv: &Vec<String>| !argv.is_empty());
        let Some(argv) = argv else {
            return Err(format!(
                "{key}: expected a list like [program, arg, …] (run without a shell)"
            ));
        };
        let field = key.strip_suffix("_command").unwrap_or(&key).to_string();
        commands.push((field, argv));
    }
    Ok(commands)
}

fn take_string(fields: &mut serde_yaml::Mapping, key: &str) -> Result<Option<String>, String> {
    match fields.remove(key) {
        None => Ok(None),
        Some(serde_yaml::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{key}: expected a string")),
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Passes every error of the wrapped source through `redactor` once more, and wakes
/// `secret_refused` when the vendor refuses a configured secret for good.
struct Redacting {
    inner: Arc<dyn TokenSource>,
    redactor: Redactor,
    secret_refused: Arc<tokio::sync::Notify>,
}

impl TokenSource for Redacting {
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(async move {
            let result = self.inner.fetch(previous).await;
            // A refused secret may have been rotated: the commands are run again. A grant
            // that needs a person's consent is not cured by any command.
            if result
                .as_ref()
                .is_err_and(|e| e.is_final() && !e.needs_consent())
            {
                self.secret_refused.notify_one();
            }
            result.map_err(|e| e.redacted(&self.redactor))
        })
    }

    fn refreshable(&self) -> bool {
        self.inner.refreshable()
    }

    fn value_refused(&self) {
        self.secret_refused.notify_one();
    }

    fn keepalive(&self) -> Option<std::time::Duration> {
        self.inner.keepalive()
    }
}

/// How a raw token becomes a header value: `scheme` then a space then the token, or the
/// bare token when the scheme is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFormat {
    scheme: String,
}

impl TokenFormat {
    /// `scheme` from the config, or `default_scheme` when absent.
    pub fn new(scheme: Option<&str>, default_scheme: &str) -> Self {
        Self {
            scheme: scheme.unwrap_or(default_scheme).to_string(),
        }
    }

    /// Writes the scheme into a fingerprint (it changes every header value sent).
    pub fn fingerprint(&self, fp: &mut Fingerprint) {
        fp.text("scheme", &self.scheme);
    }

    /// The header value for `token`.
    pub fn header_value(&self, token: &str) -> Secret {
        if self.scheme.is_empty() {
            Secret::new(token)
        } else {
            Secret::new(format!("{} {token}", self.scheme))
        }
    }
}

/// Validates `scheme` (a single word, or `""` for the bare token).
fn scheme_format(
    ctx: &mut ValidateCtx<'_>,
    scheme: Option<&str>,
    default_scheme: &str,
) -> Option<TokenFormat> {
    if let Some(s) = scheme {
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            ctx.problem(
                "scheme",
                format!("`{s}` must be a single word like `Bearer`"),
            );
            return None;
        }
    }
    Some(TokenFormat::new(scheme, default_scheme))
}

/// Unit-test helper shared by the credential files: validates one YAML section (without
/// `type:`) as type `T` with the given variables and returns its settings or every problem.
#[cfg(test)]
pub(crate) fn validate_for_test<T: CredentialType>(
    yaml: &str,
    env: &[(&str, &str)],
) -> Result<T::Settings, Vec<String>> {
    let mut fields: serde_yaml::Mapping =
        serde_yaml::from_str(yaml).map_err(|e| vec![e.to_string()])?;
    fields.insert("type".into(), T::NAME.into());
    let parsed = parse_credential(fields).map_err(|e| vec![e])?;
    let env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut ctx = ValidateCtx::new(&env, std::env::temp_dir());
    let validated = parsed.validate(&mut ctx);
    let problems = ctx.into_problems();
    match validated {
        Some(v) if problems.is_empty() => v
            .kind
            .settings::<T>()
            .cloned()
            .ok_or_else(|| vec!["settings of another type".to_string()]),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A credential type that is implemented but not listed in `credential_types!` could not
    /// be reached from YAML: every `impl CredentialType for X` in this folder must be listed.
    #[test]
    fn every_credential_type_is_registered() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/credentials");
        let registry = include_str!("mod.rs");
        let list = &registry[registry.find("\ncredential_types! {").unwrap()..];
        let list = &list[..list.find('}').unwrap()];
        let mut found = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let module = path.file_stem().unwrap().to_str().unwrap().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("impl CredentialType for ") {
                    let ty = rest.trim_end_matches(" {").trim();
                    assert!(
                        list.contains(&format!("{module}::{ty},")),
                        "{module}::{ty} implements CredentialType but is not in credential_types!"
                    );
                    found += 1;
                }
            }
        }
        assert_eq!(found, type_names().len(), "{:?}", type_names());
        let mut names = type_names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len(), "type names are unique");
    }

    #[test]
    fn shared_fields_are_read_once_and_checked_per_type() {
        let parse = |yaml: &str| {
            let fields: serde_yaml::Mapping = serde_yaml::from_str(yaml).unwrap();
            let env = std::collections::HashMap::<String, String>::new();
            let mut ctx = ValidateCtx::new(&env, std::env::temp_dir());
            let parsed = parse_credential(fields)?;
            let validated = parsed.validate(&mut ctx);
            let problems = ctx.into_problems();
            match validated {
                Some(v) if problems.is_empty() => Ok(v),
                _ => Err(problems.join("; ")),
            }
        };
        let v = parse("type: static\nvalue: k\nheader: X-Api-Key\n").unwrap();
        assert_eq!(v.header.as_str(), "x-api-key");
        assert_eq!(v.kind.type_name(), "static");
        let e = parse("type: static\nvalue: k\nscheme: Bearer\n").unwrap_err();
        assert!(e.contains("scheme") && e.contains("does not apply"), "{e}");
        let e = parse("type: static\nvalue: k\nprefetch: true\n").unwrap_err();
        assert!(e.contains("prefetch"), "{e}");
        let e = parse("type: static\nvalue: k\nbogus: 1\n").unwrap_err();
        assert!(
            e.contains("unknown field `bogus`") && e.contains("`header`"),
            "{e}"
        );
        let e = parse("type: nope\n").unwrap_err();
        assert!(
            e.contains("unknown variant `nope`") && e.contains("`login`"),
            "{e}"
        );
        let v = parse(
            "type: oauth2_client_credentials\ntoken_url: https://a.test/t\nclient_id: c\n\
             client_secret: s\nprefetch: true\nscheme: Token\n",
        )
        .unwrap();
        assert!(v.prefetch);
        let secret_free = format!("{:?}", v.kind);
        assert!(
            !secret_free.contains("client_secret: \"s\""),
            "{secret_free}"
        );
    }

    #[test]
    fn redacted_errors_hide_tokens_from_answers() {
        let doc = serde_json::json!({"data": {"accessToken": "at-secret-1"}});
        let r = Redactor::default().with_answer_secrets(&doc);
        let e = CredentialError::Rejected {
            status: 400,
            detail: "at-secret-1".into(),
        }
        .redacted(&r);
        assert!(!e.to_string().contains("at-secret-1"), "{e}");
    }
}
