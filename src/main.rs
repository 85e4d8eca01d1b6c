//! `sandgate`: parses the command line, loads config, sets up tracing, calls into the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use http::{Method, StatusCode};
use serde_json::{json, Value};

use sandgate::client::{ApiClient, ApiResponse};
use sandgate::config::Config;
use sandgate::gateway::Gateway;
use sandgate::server::{self, Listeners};

#[derive(Parser)]
#[command(
    name = "sandgate",
    version,
    about = "A secure TLS gateway to services inside sandboxes, with short-lived connect tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the biggest variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway (TLS listener + telemetry listener).
    Serve(ConfigArg),
    /// Certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The cluster key-encryption key that seals signing keys in PostgreSQL.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Create, inspect and terminate sandboxes (calls the API).
    Sandbox {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Mint, list and revoke connect tokens (calls the API).
    Token {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage API credentials (admin; calls the API).
    Credential {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: CredentialCommand,
    },
    /// Copy a file into or out of a running isolated sandbox, streamed (`-` is stdin or
    /// stdout).
    #[command(
        after_help = "Examples:\n  sandgate cp ./data.csv sb-1a2b:/workspace/data.csv\n  sandgate cp --mode 0755 build.sh sb-1a2b:/workspace/bin/build.sh\n  sandgate cp sb-1a2b:/workspace/out.tar.gz .\n  tar c src | sandgate cp - sb-1a2b:/tmp/src.tar"
    )]
    Cp {
        #[command(flatten)]
        api: ApiArgs,
        /// Where from: a local path, `-` (stdin), or SANDBOX:PATH.
        source: String,
        /// Where to: SANDBOX:PATH, or a local path (a folder keeps the name), `-` (stdout).
        dest: String,
        /// Permission bits of an uploaded file, octal (e.g. 0755).
        #[arg(long)]
        mode: Option<String>,
    },
    /// List a folder of a running isolated sandbox (SANDBOX:PATH).
    Ls {
        #[command(flatten)]
        api: ApiArgs,
        /// SANDBOX:PATH, e.g. sb-1a2b:/workspace
        target: String,
    },
    /// Import, list and delete images (root filesystems for isolated sandboxes; calls the API).
    #[command(
        after_help = "Examples:\n  docker save python:3.12-slim | sandgate image import python -\n  sandgate image import python ./python.tar\n  sandgate image list\n  sandgate image rm python"
    )]
    Image {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Snapshot a running isolated sandbox into a new image: its /workspace and what it changed
    /// in its root (calls the API). Start from it with `sandbox create --image NAME`.
    #[command(
        after_help = "Examples:\n  sandgate snapshot sb-1a2b prepared-env\n  sandgate sandbox create --image prepared-env -- python3 -m http.server 8000"
    )]
    Snapshot {
        #[command(flatten)]
        api: ApiArgs,
        /// The sandbox's id.
        sandbox: String,
        /// The new image's name: 1 to 63 of a-z, 0-9 and -.
        name: String,
    },
    /// Show recent audit events (admin; calls the API).
    Audit {
        #[command(flatten)]
        api: ApiArgs,
        /// How many events, newest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import the archive `docker save` (or `podman save`) writes, streamed (admin).
    Import {
        /// 1 to 63 of a-z, 0-9 and -.
        name: String,
        /// The archive, or `-` for stdin.
        file: String,
    },
    /// List the images (`host` is built in).
    List,
    /// Delete an image no live sandbox uses (admin).
    Rm { name: String },
}

#[derive(Args)]
struct ConfigArg {
    /// Config file [default: $SANDGATE_CONFIG, then config/sandgate.toml, then built-in defaults]
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a local CA and a server certificate for the base domain (kept if present).
    Dev(ConfigArg),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a new signing key. Running gateways sign with it within seconds; tokens signed by
    /// older keys stay valid until they expire.
    Rotate(ConfigArg),
}

#[derive(Subcommand)]
enum KekCommand {
    /// Print a new random key-encryption key (64 hex characters) for `$SANDGATE_KEK` or
    /// `[cluster] kek_file`. Every node of a cluster needs the same one.
    Generate,
}

/// The `--help` section of the options every client command shares.
const GATEWAY_OPTIONS: &str = "Gateway options";

// clap appends `[env: NAME]` to each help line itself, so the doc comments below don't repeat it.
#[derive(Args)]
struct ApiArgs {
    /// Gateway URL [default: from the local config]
    #[arg(long, env = "SANDGATE_URL", global = true, help_heading = GATEWAY_OPTIONS)]
    url: Option<String>,
    /// API key [default: the local bootstrap admin key, if readable]
    #[arg(
        long,
        env = "SANDGATE_API_KEY",
        hide_env_values = true,
        global = true,
        help_heading = GATEWAY_OPTIONS
    )]
    api_key: Option<String>,
    /// CA certificate to trust [default: the local dev CA, if present]
    #[arg(long, env = "SANDGATE_CA_CERT", global = true, help_heading = GATEWAY_OPTIONS)]
    ca: Option<PathBuf>,
    /// Print raw JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum SandboxCommand {
    /// Create a sandbox: run a command (after `--`), or register a service run elsewhere
    /// (`--upstream`).
    #[command(
        after_help = "Examples:\n  sandgate sandbox create --port 8000 --wait --open-port 8000 -- sh -c 'exec python3 -m http.server $PORT'\n  sandgate sandbox create --upstream 10.0.3.7 --port 8888\n  sandgate sandbox create --name job-42 --reuse --tag team=ml --port 8000 -- python3 -m http.server 8000"
    )]
    Create {
        /// Host of a service run elsewhere (e.g. 127.0.0.1); port P is reached at HOST:P.
        #[arg(long, conflicts_with = "command")]
        upstream: Option<String>,
        /// The command to run; it gets PORT (host port of the first published port) and
        /// PORT_<n> for each published port n.
        #[arg(last = true)]
        command: Vec<String>,
        /// Environment for the command, KEY=VALUE (repeat).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Secret environment for the command (and every exec), KEY=VALUE (repeat): never
        /// shown back, logged or audited. The value is in your shell history and `ps`; prefer
        /// --secret-env-file.
        // Checked in `secret_env_map`, not by clap, whose refusal would repeat the value.
        #[arg(long = "secret-env", value_name = "KEY=VALUE")]
        secret_env: Vec<String>,
        /// A file of secret KEY=VALUE lines (blank lines and `#` comments skipped), as
        /// --secret-env but out of your shell history and `ps`.
        #[arg(long = "secret-env-file")]
        secret_env_file: Option<std::path::PathBuf>,
        /// Address-space limit per process, MiB.
        #[arg(long)]
        memory_mb: Option<u64>,
        /// CPU-time limit per process, seconds.
        #[arg(long)]
        cpu_secs: Option<u64>,
        /// Maximum processes.
        #[arg(long)]
        max_processes: Option<u64>,
        /// Maximum open files per process.
        #[arg(long)]
        max_open_files: Option<u64>,
        /// Wait until the sandbox is running (or has failed), showing progress.
        #[arg(long)]
        wait: bool,
        /// With --wait: also mint a token for this port and print a ready-to-open URL.
        #[arg(long, requires = "wait")]
        open_port: Option<u16>,
        /// A published port (repeat for several).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// An origin allowed to call this sandbox cross-origin (repeat for several).
        #[arg(long = "cors-origin")]
        cors_origins: Vec<String>,
        /// Send the upstream its own host:port as Host (for dev servers that accept only
        /// localhost).
        #[arg(long)]
        rewrite_host: bool,
        /// End the sandbox after this long (e.g. 30m, 2h).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<i64>,
        /// Metadata as a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// A name (1-63 of a-z, 0-9, -), unique among your live sandboxes.
        #[arg(long)]
        name: Option<String>,
        /// With --name: if a live sandbox has that name, print it instead of failing.
        #[arg(long, requires = "name")]
        reuse: bool,
        /// A tag, KEY=VALUE (repeat, at most 32).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// The image (or snapshot) to start from (see `sandgate image list`); without a
        /// command after `--`, the image's Cmd runs.
        #[arg(long, conflicts_with = "upstream")]
        image: Option<String>,
    },
    /// List live sandboxes (starting or running); --all adds ended ones.
    List {
        /// Also show stopped, failed and lost sandboxes.
        #[arg(long)]
        all: bool,
        /// Only the sandboxes with this name.
        #[arg(long)]
        name: Option<String>,
        /// Only the sandboxes with this tag, KEY=VALUE (repeat: all must match).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Replace a sandbox's tags.
    #[command(
        after_help = "Examples:\n  sandgate sandbox tag sbx123 team=ml stage=2\n  sandgate sandbox tag sbx123 --clear"
    )]
    Tag {
        /// Sandbox id.
        id: String,
        /// The new tags, KEY=VALUE; every tag not listed is removed.
        #[arg(value_parser = parse_tag, required_unless_present = "clear")]
        tags: Vec<(String, String)>,
        /// Remove every tag.
        #[arg(long, conflicts_with = "tags")]
        clear: bool,
    },
    /// Show one sandbox.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// Terminate a sandbox: its tokens stop working and its connections close.
    Rm {
        /// Sandbox id.
        id: String,
    },
    /// Run a command inside a sandbox; prints its output and exits with its exit code.
    Exec {
        /// Sandbox id.
        id: String,
        /// Give up (and kill it) after this long [default: the gateway's, 60s]
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<i64>,
        /// Extra environment, KEY=VALUE (repeat).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a sandbox's output so far.
    Logs {
        /// Sandbox id.
        id: String,
        /// Keep streaming new output until the sandbox ends.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a connect token for one port of a sandbox; prints the token, a URL that opens the
    /// port in a browser, the token's id (jti, for `token revoke`) and its expiry.
    Create {
        /// Sandbox id.
        sandbox: String,
        /// The sandbox port the token opens (one of the ports the sandbox publishes).
        #[arg(long)]
        port: u16,
        /// Lifetime (e.g. 90s, 10m, 1h) [default: the gateway's default, 10m]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<i64>,
        /// The token works for one request (or one link exchange) only.
        #[arg(long)]
        single_use: bool,
        /// User metadata as a JSON object, passed to the sandbox in X-Sandgate-User-Metadata.
        #[arg(long)]
        metadata: Option<String>,
    },
    /// List live tokens (not expired, not revoked): ids and claims, never the tokens.
    List {
        /// Only the tokens of this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Revoke a token by its id (jti); connections opened with it close. Exits 4 if no live
    /// token has that id.
    Revoke {
        /// The token's id, as `token create` and `token list` print it. A jti is base64url,
        /// so it may begin with `-`: taken as the id, not as an option.
        #[arg(allow_hyphen_values = true)]
        jti: String,
    },
}

#[derive(Subcommand)]
enum CredentialCommand {
    /// Create an API credential; its secret is printed once.
    #[command(
        after_help = "Example:\n  sandgate credential create --name ci --scope sandboxes:write --scope tokens:issue"
    )]
    Create {
        /// A label for people, e.g. the team or job that uses the key (1-128 characters).
        #[arg(long)]
        name: String,
        /// admin, sandboxes:read, sandboxes:write, upstreams:write, tokens:issue, tokens:revoke
        /// (repeat; an `upstream` sandbox needs sandboxes:write and upstreams:write).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Expire the credential after this long (e.g. 30d, 12h) [default: never]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<i64>,
        /// Longest connect-token lifetime this credential may ask for (e.g. 10m, 1h).
        #[arg(long, value_parser = parse_duration)]
        max_token_ttl: Option<i64>,
    },
    /// List credentials (never their secrets).
    List,
    /// Revoke a credential at once.
    Revoke {
        /// Credential id (cred_...).
        id: String,
    },
}

/// Exit codes scripts can rely on.
mod exit {
    pub(crate) const FAILURE: u8 = 1;
    pub(crate) const UNAUTHORIZED: u8 = 3;
    pub(crate) const NOT_FOUND: u8 = 4;
    pub(crate) const UNREACHABLE: u8 = 5;
    pub(crate) const INVALID: u8 = 6;
}

fn main() -> ExitCode {
    // The sandbox launcher's roles run before anything else (single-threaded, no runtime).
    if let Some(role) = std::env::args_os().nth(1) {
        if let Some(code) = role.to_str().and_then(sandgate::sandbox::launch::dispatch) {
            return code;
        }
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    runtime.block_on(async move {
        match run(cli).await {
            Ok(code) => code,
            Err(err) => {
                eprintln!("error: {}", report(&err));
                if let Some(sandgate::client::ClientError::Connect { .. }) = err.downcast_ref() {
                    let ca = match local_file(|c| c.store.certs_dir().join("ca.pem")) {
                        Some(path) => format!("SANDGATE_CA_CERT={}", path.display()),
                        None => "SANDGATE_CA_CERT to certs/ca.pem in the gateway's data directory ([store] data_dir, `data/` by default)".to_string(),
                    };
                    eprintln!("hint: is `sandgate serve` running, and is SANDGATE_URL right? For the dev CA, set {ca}");
                    return ExitCode::from(exit::UNREACHABLE);
                }
                ExitCode::from(exit::FAILURE)
            }
        }
    })
}

/// The error and its causes, each said once: `what failed: why: why`.
///
/// Many of the library's errors quote their cause in their own message (so that a log line
/// with `%err` is complete) and also return it as `source()`; printing the whole chain, as
/// anyhow's `{:#}` does, would then say each such cause twice. A cause whose text is already
/// in what has been printed is skipped.
fn report(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(arg) => serve(arg.config.as_deref()).await,
        Command::Certs {
            command: CertsCommand::Dev(arg),
        } => {
            let config = Config::load_default(arg.config.as_deref())?;
            let dir = config.store.certs_dir();
            let (paths, created) =
                sandgate::tls::ensure_dev_certs(&dir, &config.gateway.base_domain)?;
            println!(
                "{} dev CA and certificate for {} and *.{}",
                if created {
                    "Created"
                } else {
                    "Kept the existing"
                },
                config.gateway.base_domain,
                config.gateway.base_domain
            );
            println!("  CA (trust this):  {}", paths.ca_cert.display());
            println!("  certificate:      {}", paths.cert.display());
            println!("  private key:      {}", paths.key.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Rotate(arg),
        } => {
            let config = Config::load_default(arg.config.as_deref())?;
            let store = sandgate::store::open(&config.store, "sandgate keys rotate").await?;
            let key = sandgate::gateway::add_signing_key(store.as_ref()).await?;
            println!(
                "Added signing key {}; running gateways sign with it within 5 s. Tokens signed by older keys stay valid until they expire.",
                key.kid()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Kek {
            command: KekCommand::Generate,
        } => {
            println!("{}", sandgate::store::postgres::generate_kek());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox { api, command } => sandbox_command(api, command).await,
        Command::Token { api, command } => token_command(api, command).await,
        Command::Credential { api, command } => credential_command(api, command).await,
        Command::Cp {
            api,
            source,
            dest,
            mode,
        } => copy(&api, &source, &dest, mode.as_deref()).await,
        Command::Ls { api, target } => list_files(&api, &target).await,
        Command::Image { api, command } => image_command(api, command).await,
        Command::Snapshot { api, sandbox, name } => {
            let client = connect(&api)?;
            let r = client
                .call(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/snapshots", path_segment(&sandbox)?),
                    Some(&json!({ "name": name })),
                )
                .await?;
            finish(&api, r, |v| {
                println!(
                    "Snapshot {} of {sandbox}: {} bytes over image {}",
                    s(v, "name"),
                    s(v, "size_bytes"),
                    s(v, "base")
                )
            })
        }
        Command::Audit { api, limit } => {
            let client = connect(&api)?;
            let r = client
                .call(Method::GET, &format!("/v1/audit?limit={limit}"), None)
                .await?;
            finish(&api, r, |v| {
                table(
                    &["TIME", "ACTOR", "ACTION", "TARGET", "CLIENT"],
                    items(v)
                        .iter()
                        .map(|e| {
                            vec![
                                s(e, "time"),
                                s(e, "actor"),
                                s(e, "action"),
                                s(e, "target"),
                                s(e, "client_addr"),
                            ]
                        })
                        .collect(),
                )
            })
        }
    }
}

async fn serve(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load_default(config_path)?;
    sandgate::telemetry::init_tracing(&config.telemetry.log_level, config.telemetry.log_json);
    match &config.source {
        Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
        None => tracing::info!("no config file found; running on built-in defaults"),
    }
    // The error names the listener's key and what to do.
    let listeners = Listeners::bind(
        config.gateway.listen,
        config.telemetry.listen,
        config.gateway.workers,
    )
    .await?;
    let gw = Gateway::open(config).await?;
    let cfg = &gw.config;
    let port = if cfg.gateway.public_port == 443 {
        String::new()
    } else {
        format!(":{}", cfg.gateway.public_port)
    };
    tracing::info!(
        api = %format!("https://{}{}/v1", cfg.gateway.base_domain, port),
        sandboxes = %format!("https://<port>-<id>.{}{}", cfg.gateway.base_domain, port),
        admin_key_file = %cfg.store.admin_key_path().display(),
        telemetry = %format!("http://{}/metrics", cfg.telemetry.listen),
        "sandgate is ready"
    );
    spawn_reload_on_hangup(Arc::clone(&gw));
    server::run(gw, listeners, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// SIGHUP re-reads the certificate files; a broken file keeps the old certificate.
fn spawn_reload_on_hangup(gw: Arc<Gateway>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match gw.certs.reload() {
                Ok(()) => tracing::info!("certificate reloaded"),
                Err(err) => {
                    tracing::error!(error = %err, "certificate reload failed; keeping the old one")
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Client commands

/// Builds the API client, filling gaps from the local config (URL, dev CA, bootstrap key).
fn connect(api: &ApiArgs) -> anyhow::Result<ApiClient> {
    let local = Config::load_default(None).ok();
    let url = match &api.url {
        Some(u) => u.clone(),
        None => match &local {
            Some(c) => {
                let port = if c.gateway.public_port == 443 {
                    String::new()
                } else {
                    format!(":{}", c.gateway.public_port)
                };
                format!("https://{}{}", c.gateway.base_domain, port)
            }
            None => "https://sandbox.localhost:8443".to_string(),
        },
    };
    let ca = api.ca.clone().or_else(|| {
        local
            .as_ref()
            .map(|c| c.store.certs_dir().join("ca.pem"))
            .filter(|p| p.exists())
    });
    let key = api.api_key.clone().or_else(|| {
        local
            .as_ref()
            .and_then(|c| std::fs::read_to_string(c.store.admin_key_path()).ok())
            .map(|k| k.trim().to_string())
    });
    if key.is_none() {
        bail!("no API key: set SANDGATE_API_KEY ({})", admin_key_hint());
    }
    Ok(ApiClient::new(&url, key, ca.as_deref())?)
}

/// A file of the local gateway (found as [`connect`] finds the URL, CA and key), as an
/// absolute path, if it exists.
fn local_file(path_of: impl Fn(&Config) -> PathBuf) -> Option<PathBuf> {
    let path = path_of(&Config::load_default(None).ok()?);
    std::fs::canonicalize(&path).ok()
}

/// Where the bootstrap admin key is: the real path when the local gateway's key is readable
/// from here, else where to look.
fn admin_key_hint() -> String {
    match local_file(|c| c.store.admin_key_path()) {
        Some(path) => format!("the bootstrap admin key is in {}", path.display()),
        None => "the bootstrap admin key is admin.key in the gateway's data directory ([store] data_dir, `data/` by default)".to_string(),
    }
}

/// Prints a successful answer (JSON or human form) or explains a failed one.
fn finish(api: &ApiArgs, r: ApiResponse, human: impl FnOnce(&Value)) -> anyhow::Result<ExitCode> {
    if r.status.is_success() {
        let v = r.json()?;
        if api.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            human(&v);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (code, message) = r.error().unwrap_or_else(|| {
        (
            "unknown".into(),
            String::from_utf8_lossy(&r.body).into_owned(),
        )
    });
    eprintln!("error: {message} ({code}, HTTP {})", r.status.as_u16());
    let exit = match r.status.as_u16() {
        401 => {
            eprintln!("hint: check SANDGATE_API_KEY; {}", admin_key_hint());
            exit::UNAUTHORIZED
        }
        403 => exit::UNAUTHORIZED,
        404 => exit::NOT_FOUND,
        400 | 409 | 413 | 422 => exit::INVALID,
        _ => exit::FAILURE,
    };
    Ok(ExitCode::from(exit))
}

async fn sandbox_command(api: ApiArgs, command: SandboxCommand) -> anyhow::Result<ExitCode> {
    let client = connect(&api)?;
    let r = match &command {
        SandboxCommand::Create {
            upstream,
            command,
            env,
            secret_env,
            secret_env_file,
            memory_mb,
            cpu_secs,
            max_processes,
            max_open_files,
            wait,
            open_port,
            ports,
            cors_origins,
            rewrite_host,
            timeout,
            metadata,
            name,
            reuse,
            tags,
            image,
        } => {
            let mut body = json!({
                "ports": ports,
                "cors_origins": cors_origins,
                "rewrite_host": rewrite_host,
            });
            match (upstream, command.is_empty()) {
                (Some(u), true) => body["upstream"] = json!(u),
                (None, no_command) if !no_command || image.is_some() => {
                    if !no_command {
                        body["command"] = json!(command);
                    }
                    if let Some(image) = image {
                        body["image"] = json!(image);
                    }
                    body["env"] = json!(env
                        .iter()
                        .cloned()
                        .collect::<std::collections::BTreeMap<_, _>>());
                    let secrets = secret_env_map(secret_env, secret_env_file.as_deref())?;
                    if !secrets.is_empty() {
                        body["secret_env"] = json!(secrets);
                    }
                    for (key, v) in [
                        ("memory_mb", memory_mb),
                        ("cpu_secs", cpu_secs),
                        ("max_processes", max_processes),
                        ("max_open_files", max_open_files),
                    ] {
                        if let Some(v) = v {
                            body[key] = json!(v);
                        }
                    }
                }
                _ => bail!("give a command after `--` (or --image with a Cmd), or --upstream HOST (see --help)"),
            }
            if let Some(t) = timeout {
                body["timeout_secs"] = json!(t);
            }
            if let Some(m) = metadata {
                body["metadata"] = parse_json_object(m, "--metadata")?;
            }
            if let Some(name) = name {
                body["name"] = json!(name);
                body["reuse"] = json!(reuse);
            }
            if !tags.is_empty() {
                body["tags"] = json!(tag_map(tags)?);
            }
            let r = client
                .call(Method::POST, "/v1/sandboxes", Some(&body))
                .await?;
            if r.status == StatusCode::OK && !api.json {
                eprintln!(
                    "reusing the live sandbox named {}",
                    name.as_deref().unwrap_or_default()
                );
            }
            if *wait && r.status.is_success() {
                let id = r.json()?["id"].as_str().unwrap_or_default().to_string();
                return wait_running(&api, &client, &id, *open_port).await;
            }
            r
        }
        SandboxCommand::Exec {
            id,
            timeout,
            env,
            command,
        } => {
            let mut body = json!({
                "command": command,
                "env": env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            });
            if let Some(t) = timeout {
                body["timeout_secs"] = json!(t);
            }
            let path = format!("/v1/sandboxes/{}/exec", path_segment(id)?);
            let r = client.call(Method::POST, &path, Some(&body)).await?;
            if !r.status.is_success() || api.json {
                return finish(&api, r, |_| {});
            }
            let v = r.json()?;
            print!("{}", v["stdout"].as_str().unwrap_or_default());
            eprint!("{}", v["stderr"].as_str().unwrap_or_default());
            if v["stdout_truncated"].as_bool() == Some(true)
                || v["stderr_truncated"].as_bool() == Some(true)
            {
                eprintln!("sandgate: output truncated");
            }
            if v["timed_out"].as_bool() == Some(true) {
                eprintln!("sandgate: the command timed out and was killed");
                return Ok(ExitCode::from(124));
            }
            let code = match (v["exit_code"].as_i64(), v["signal"].as_i64()) {
                (Some(c), _) => u8::try_from(c).unwrap_or(1),
                (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
                _ => 1,
            };
            return Ok(ExitCode::from(code));
        }
        SandboxCommand::Logs { id, follow } => {
            let path = format!(
                "/v1/sandboxes/{}/logs{}",
                path_segment(id)?,
                if *follow { "?follow=true" } else { "" }
            );
            return stream_logs(&api, &client, &path).await;
        }
        SandboxCommand::List { all, name, tags } => {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            if let Some(name) = name {
                query.append_pair("name", name);
            }
            for (k, v) in tags {
                query.append_pair("tag", &format!("{k}={v}"));
            }
            let query = query.finish();
            let path = if query.is_empty() {
                "/v1/sandboxes".to_owned()
            } else {
                format!("/v1/sandboxes?{query}")
            };
            let r = client.call(Method::GET, &path, None).await?;
            if *all {
                r
            } else {
                only_live(r)?
            }
        }
        SandboxCommand::Get { id } => {
            client
                .call(
                    Method::GET,
                    &format!("/v1/sandboxes/{}", path_segment(id)?),
                    None,
                )
                .await?
        }
        SandboxCommand::Rm { id } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/v1/sandboxes/{}", path_segment(id)?),
                    None,
                )
                .await?
        }
        SandboxCommand::Tag { id, tags, .. } => {
            let body = json!({ "tags": tag_map(tags)? });
            client
                .call(
                    Method::PATCH,
                    &format!("/v1/sandboxes/{}", path_segment(id)?),
                    Some(&body),
                )
                .await?
        }
    };
    finish(&api, r, |v| match command {
        SandboxCommand::List { .. } => table(
            &["ID", "NAME", "STATUS", "PORTS", "TAGS", "OWNER", "CREATED"],
            items(v)
                .iter()
                .map(|s| {
                    vec![
                        self::s(s, "id"),
                        self::s(s, "name"),
                        self::s(s, "status"),
                        ports(s),
                        tags_text(s),
                        self::s(s, "owner"),
                        self::s(s, "created_at"),
                    ]
                })
                .collect(),
        ),
        SandboxCommand::Rm { id } => println!("Terminated {id}"),
        SandboxCommand::Tag { id, .. } => println!("Tagged {id}: {}", tags_text(v)),
        SandboxCommand::Exec { .. } | SandboxCommand::Logs { .. } => {}
        SandboxCommand::Create { .. } => println!("{}", s(v, "id")),
        SandboxCommand::Get { .. } => {
            for key in [
                "id",
                "status",
                "owner",
                "created_at",
                "expires_at",
                "ended_at",
                "upstream",
                "name",
            ] {
                println!("{key:<11} {}", s(v, key));
            }
            println!("{:<11} {}", "ports", ports(v));
            println!("{:<11} {}", "tags", tags_text(v));
        }
    })
}

async fn token_command(api: ApiArgs, command: TokenCommand) -> anyhow::Result<ExitCode> {
    let client = connect(&api)?;
    match command {
        TokenCommand::Create {
            sandbox,
            port,
            ttl,
            single_use,
            metadata,
        } => {
            let mut body = json!({ "port": port, "single_use": single_use });
            if let Some(t) = ttl {
                body["ttl_secs"] = json!(t);
            }
            if let Some(m) = metadata {
                body["user_metadata"] = parse_json_object(&m, "--metadata")?;
            }
            let path = format!("/v1/sandboxes/{}/connect-tokens", path_segment(&sandbox)?);
            let r = client.call(Method::POST, &path, Some(&body)).await?;
            finish(&api, r, |v| {
                println!("token:      {}", s(v, "token"));
                println!("url:        {}", s(v, "url"));
                println!("jti:        {}", s(v, "jti"));
                println!("expires_at: {}", s(v, "expires_at"));
            })
        }
        TokenCommand::List { sandbox } => {
            let path = match &sandbox {
                Some(id) => format!("/v1/connect-tokens?sandbox={}", path_segment(id)?),
                None => "/v1/connect-tokens".to_string(),
            };
            let r = client.call(Method::GET, &path, None).await?;
            finish(&api, r, |v| {
                table(
                    &["JTI", "SANDBOX", "PORT", "EXPIRES"],
                    items(v)
                        .iter()
                        .map(|t| {
                            vec![
                                s(t, "jti"),
                                s(t, "sandbox"),
                                s(t, "port"),
                                s(t, "expires_at"),
                            ]
                        })
                        .collect(),
                )
            })
        }
        TokenCommand::Revoke { jti } => {
            let path = format!("/v1/connect-tokens/{}", path_segment(&jti)?);
            let r = client.call(Method::DELETE, &path, None).await?;
            finish(&api, r, |_| println!("Revoked {jti}"))
        }
    }
}

async fn credential_command(api: ApiArgs, command: CredentialCommand) -> anyhow::Result<ExitCode> {
    let client = connect(&api)?;
    match command {
        CredentialCommand::Create {
            name,
            scopes,
            ttl,
            max_token_ttl,
        } => {
            let mut body = json!({ "name": name, "scopes": scopes });
            if let Some(t) = ttl {
                body["ttl_secs"] = json!(t);
            }
            if let Some(t) = max_token_ttl {
                body["max_token_ttl_secs"] = json!(t);
            }
            let r = client
                .call(Method::POST, "/v1/credentials", Some(&body))
                .await?;
            finish(&api, r, |v| {
                println!("id:     {}", s(v, "id"));
                println!("secret: {}", s(v, "secret"));
                println!("(the secret is shown only now; store it safely)");
            })
        }
        CredentialCommand::List => {
            let r = client.call(Method::GET, "/v1/credentials", None).await?;
            finish(&api, r, |v| {
                table(
                    &["ID", "NAME", "SCOPES", "EXPIRES", "REVOKED"],
                    items(v)
                        .iter()
                        .map(|c| {
                            let scopes = c["scopes"]
                                .as_array()
                                .map(|a| {
                                    a.iter()
                                        .filter_map(Value::as_str)
                                        .collect::<Vec<_>>()
                                        .join(",")
                                })
                                .unwrap_or_default();
                            vec![
                                s(c, "id"),
                                s(c, "name"),
                                scopes,
                                s(c, "expires_at"),
                                s(c, "revoked_at"),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CredentialCommand::Revoke { id } => {
            let path = format!("/v1/credentials/{}", path_segment(&id)?);
            let r = client.call(Method::DELETE, &path, None).await?;
            finish(&api, r, |_| println!("Revoked {id}"))
        }
    }
}

/// Polls a new sandbox until it runs or fails, printing progress to stderr.
async fn wait_running(
    api: &ApiArgs,
    client: &ApiClient,
    id: &str,
    open_port: Option<u16>,
) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/sandboxes/{}", path_segment(id)?);
    let started = std::time::Instant::now();
    eprint!("sandbox {id}: starting");
    let mut told = false;
    loop {
        let r = client.call(Method::GET, &path, None).await?;
        if !r.status.is_success() {
            eprintln!();
            return finish(api, r, |_| {});
        }
        let v = r.json()?;
        match v["status"].as_str() {
            Some("running") => {
                eprintln!(" → running ({:.1}s)", started.elapsed().as_secs_f64());
                break;
            }
            Some("starting") => {
                // Once: what it waits for (the port and the variable the command must use).
                if !told {
                    if let Some(detail) = v["detail"].as_str() {
                        eprint!(" ({detail})");
                    }
                    told = true;
                }
                eprint!(".");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            other => {
                eprintln!(" → {}", other.unwrap_or("unknown"));
                if let Some(detail) = v["detail"].as_str() {
                    eprintln!("{detail}");
                }
                return Ok(ExitCode::from(exit::FAILURE));
            }
        }
    }
    if api.json && open_port.is_none() {
        let r = client.call(Method::GET, &path, None).await?;
        return finish(api, r, |_| {});
    }
    println!("{id}");
    if let Some(port) = open_port {
        let r = client
            .call(
                Method::POST,
                &format!("{path}/connect-tokens"),
                Some(&json!({ "port": port })),
            )
            .await?;
        return finish(api, r, |v| println!("{}", s(v, "url")));
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies a (possibly endless) text response to stdout as it arrives.
async fn stream_logs(api: &ApiArgs, client: &ApiClient, path: &str) -> anyhow::Result<ExitCode> {
    use http_body_util::BodyExt;
    use std::io::Write;
    let response = client.stream(Method::GET, path).await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return finish(api, ApiResponse { status, body }, |_| {});
    }
    let mut body = response.into_body();
    let mut out = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the log stream broke")?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Files: cp and ls

/// `SANDBOX:/path` → (id, path); anything else is local (write `./a:/b` for a local file
/// whose name looks like one).
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    let is_id = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (is_id && path.starts_with('/')).then_some((id, path))
}

fn files_path(id: &str, path: &str, extra: &str) -> anyhow::Result<String> {
    let path: String = url::form_urlencoded::byte_serialize(path.as_bytes()).collect();
    Ok(format!(
        "/v1/sandboxes/{}/files?path={path}{extra}",
        path_segment(id)?
    ))
}

/// A byte count on standard error, redrawn at most ten times a second, on a terminal only.
struct Progress {
    total: Option<u64>,
    done: u64,
    shown: bool,
    started: std::time::Instant,
    drawn: Option<std::time::Instant>,
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        use std::io::IsTerminal;
        Progress {
            total,
            done: 0,
            shown: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
            drawn: None,
        }
    }

    fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.shown
            && self
                .drawn
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(100))
        {
            self.draw();
        }
    }

    fn draw(&mut self) {
        fn human(n: u64) -> String {
            let mut v = n as f64;
            for unit in ["B", "KiB", "MiB", "GiB"] {
                if v < 1024.0 || unit == "GiB" {
                    return format!("{v:.1} {unit}");
                }
                v /= 1024.0;
            }
            unreachable!("the loop returns at GiB")
        }
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let text = match self.total {
            Some(t) if t > 0 => format!(
                "{} / {} ({:.0}%), {}/s",
                human(self.done),
                human(t),
                self.done as f64 * 100.0 / t as f64,
                human(rate as u64)
            ),
            _ => format!("{}, {}/s", human(self.done), human(rate as u64)),
        };
        eprint!("\r\x1b[K{text}");
        self.drawn = Some(std::time::Instant::now());
    }

    fn end(mut self) {
        if self.shown {
            self.draw();
            eprintln!();
        }
    }
}

/// Reads a response's error body (small) and reports it as [`finish`] does.
async fn report_failure(
    api: &ApiArgs,
    response: http::Response<hyper::body::Incoming>,
) -> anyhow::Result<ExitCode> {
    use http_body_util::BodyExt;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 1024 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    finish(api, ApiResponse { status, body }, |_| {})
}

async fn copy(
    api: &ApiArgs,
    source: &str,
    dest: &str,
    mode: Option<&str>,
) -> anyhow::Result<ExitCode> {
    match (remote(source), remote(dest)) {
        (None, Some((id, path))) => upload(api, source, id, path, mode).await,
        (Some((id, path)), None) => {
            if mode.is_some() {
                bail!("--mode applies to uploads (a local source, a SANDBOX:PATH destination)");
            }
            download(api, id, path, dest).await
        }
        (Some(_), Some(_)) => bail!("copy between two sandboxes through a local file or `-`: sandgate cp A:/x - | sandgate cp - B:/x"),
        (None, None) => bail!("one side must be SANDBOX:PATH (e.g. sb-1a2b:/workspace/a.txt)"),
    }
}

/// `source` (a file, or `-` for stdin) as a request body read 64 KiB at a time as the
/// connection takes it, its length when known, and the progress shown meanwhile.
async fn streamed(
    source: &str,
    folder_hint: &str,
) -> anyhow::Result<(
    sandgate::client::RequestBody,
    Option<u64>,
    std::sync::Arc<std::sync::Mutex<Progress>>,
)> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    let (reader, length): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) =
        if source == "-" {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let file = tokio::fs::File::open(source)
                .await
                .with_context(|| format!("cannot open {source}"))?;
            let meta = file.metadata().await?;
            if meta.is_dir() {
                bail!("{source} is a folder; {folder_hint}");
            }
            (Box::new(file), Some(meta.len()))
        };
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::new(length)));
    let counted = std::sync::Arc::clone(&progress);
    // One 64 KiB chunk at a time: the next is read only when the connection took this one.
    let chunks = futures_util::stream::unfold(reader, |mut reader| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), reader))
            }
            Err(e) => Some((Err(e), reader)),
        }
    })
    .map(move |chunk: std::io::Result<bytes::Bytes>| {
        if let Ok(c) = &chunk {
            counted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .add(c.len());
        }
        chunk.map(http_body::Frame::data)
    });
    Ok((
        http_body_util::StreamBody::new(chunks).boxed_unsync(),
        length,
        progress,
    ))
}

async fn image_command(api: ApiArgs, command: ImageCommand) -> anyhow::Result<ExitCode> {
    let client = connect(&api)?;
    match command {
        ImageCommand::Import { name, file } => {
            let (body, length, progress) =
                streamed(&file, "give the archive `docker save` writes").await?;
            let path = format!(
                "/v1/images?name={}",
                url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
            );
            // Expect: 100-continue, so that a refusal the gateway sends before it reads the
            // archive (not an admin, the name exists, too large) is printed, not a broken pipe.
            let response = client
                .send_upload(Method::POST, &path, length, body)
                .await?;
            if let Ok(p) = std::sync::Arc::try_unwrap(progress) {
                p.into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .end();
            }
            if !response.status().is_success() {
                return report_failure(&api, response).await;
            }
            println!("Imported {name}");
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::List => {
            let r = client.call(Method::GET, "/v1/images", None).await?;
            finish(&api, r, |v| {
                table(
                    &["NAME", "SOURCE", "BASE", "SIZE", "CREATED"],
                    items(v)
                        .iter()
                        .map(|i| {
                            vec![
                                s(i, "name"),
                                s(i, "source"),
                                s(i, "base"),
                                s(i, "size_bytes"),
                                s(i, "created_at"),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ImageCommand::Rm { name } => {
            let path = format!("/v1/images/{}", path_segment(&name)?);
            let r = client.call(Method::DELETE, &path, None).await?;
            finish(&api, r, |_| println!("Deleted image {name}"))
        }
    }
}

async fn upload(
    api: &ApiArgs,
    source: &str,
    id: &str,
    path: &str,
    mode: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let client = connect(api)?;
    let (body, length, progress) =
        streamed(source, "sandgate cp copies one file (tar it, and copy `-`)").await?;
    let extra = match mode {
        Some(m) => format!(
            "&mode={}",
            url::form_urlencoded::byte_serialize(m.as_bytes()).collect::<String>()
        ),
        None => String::new(),
    };
    let response = client
        .send_body(Method::PUT, &files_path(id, path, &extra)?, length, body)
        .await?;
    if let Ok(p) = std::sync::Arc::try_unwrap(progress) {
        p.into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .end();
    }
    if !response.status().is_success() {
        return report_failure(api, response).await;
    }
    Ok(ExitCode::SUCCESS)
}

async fn download(api: &ApiArgs, id: &str, path: &str, dest: &str) -> anyhow::Result<ExitCode> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let client = connect(api)?;
    let response = client
        .stream(Method::GET, &files_path(id, path, "")?)
        .await?;
    if !response.status().is_success() {
        return report_failure(api, response).await;
    }
    let is_listing = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_listing {
        bail!("{id}:{path} is a folder; sandgate cp copies one file (see sandgate ls)");
    }
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if dest == "-" {
        Box::new(tokio::io::stdout())
    } else {
        let mut target = PathBuf::from(dest);
        if target.is_dir() {
            let name = Path::new(path)
                .file_name()
                .context("the remote path names no file")?;
            target.push(name);
        }
        Box::new(
            tokio::fs::File::create(&target)
                .await
                .with_context(|| format!("cannot write {}", target.display()))?,
        )
    };
    let mut progress = Progress::new(length);
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the download broke off")?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data).await?;
            progress.add(data.len());
        }
    }
    out.flush().await?;
    progress.end();
    Ok(ExitCode::SUCCESS)
}

async fn list_files(api: &ApiArgs, target: &str) -> anyhow::Result<ExitCode> {
    let Some((id, path)) = remote(target) else {
        bail!("give SANDBOX:PATH, e.g. sb-1a2b:/workspace");
    };
    let client = connect(api)?;
    let response = client
        .stream(Method::GET, &files_path(id, path, "")?)
        .await?;
    if !response.status().is_success() {
        return report_failure(api, response).await;
    }
    let is_listing = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_listing {
        // A file: its size is in the headers; its bytes are not needed.
        let size = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        drop(response);
        if api.json {
            println!(
                "{}",
                json!({"name": path, "type": "file", "size": size.parse::<u64>().ok()})
            );
        } else {
            println!("file  {size}  {path}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = response.status();
    let body = {
        use http_body_util::BodyExt;
        response.into_body().collect().await?.to_bytes()
    };
    finish(api, ApiResponse { status, body }, |v| {
        table(
            &["TYPE", "MODE", "SIZE", "MODIFIED", "NAME"],
            items(v)
                .iter()
                .map(|e| {
                    vec![
                        s(e, "type"),
                        s(e, "mode"),
                        s(e, "size"),
                        s(e, "modified_at"),
                        s(e, "name"),
                    ]
                })
                .collect(),
        );
        if v["truncated"].as_bool() == Some(true) {
            eprintln!("sandgate: the folder holds more entries than one listing shows");
        }
    })
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

/// `--secret-env KEY=VALUE`; a mistake's message never repeats the value.
fn parse_secret_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "--secret-env takes KEY=VALUE".to_string())
}

/// `--secret-env` and the lines of `--secret-env-file` as the API's `secret_env` object. A key
/// given twice is a mistake; messages name keys and line numbers, never a value.
fn secret_env_map(
    given: &[String],
    file: Option<&std::path::Path>,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut pairs = given
        .iter()
        .map(|text| parse_secret_env(text).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --secret-env-file {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let pair = parse_secret_env(line)
                .map_err(|_| anyhow::anyhow!("{} line {}: not KEY=VALUE", path.display(), n + 1))?;
            pairs.push(pair);
        }
    }
    let mut map = std::collections::BTreeMap::new();
    for (k, v) in pairs {
        if map.contains_key(&k) {
            bail!("secret env {k} is given twice");
        }
        map.insert(k, v);
    }
    Ok(map)
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE (such as team=ml)"))
}

/// `--tag` pairs as the API's `tags` object; a key given twice is a mistake, not a last-wins.
fn tag_map(
    tags: &[(String, String)],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut map = std::collections::BTreeMap::new();
    for (k, v) in tags {
        if map.insert(k.clone(), v.clone()).is_some() {
            bail!("tag `{k}` is given twice; give each key once");
        }
    }
    Ok(map)
}

/// A sandbox's tags as `k=v,k2=v2` (`-` for none).
fn tags_text(v: &Value) -> String {
    let tags: Vec<String> = v["tags"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    if tags.is_empty() {
        "-".to_owned()
    } else {
        tags.join(",")
    }
}

/// Keeps the live sandboxes (starting or running) of a successful list answer.
fn only_live(r: ApiResponse) -> anyhow::Result<ApiResponse> {
    if !r.status.is_success() {
        return Ok(r);
    }
    let live: Vec<Value> = items(&r.json()?)
        .into_iter()
        .filter(|s| matches!(s["status"].as_str(), Some("starting" | "running")))
        .collect();
    Ok(ApiResponse {
        status: r.status,
        body: serde_json::to_vec(&json!({ "items": live }))?.into(),
    })
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

fn s(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn ports(v: &Value) -> String {
    v["ports"]
        .as_array()
        .map(|a| a.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn parse_json_object(text: &str, flag: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("{flag} is not JSON"))?;
    if !v.is_object() {
        bail!("{flag} must be a JSON object, like '{{\"user\": \"ada\"}}'");
    }
    Ok(v)
}

/// Ids go into URL paths: accept only the characters ids are made of.
fn path_segment(id: &str) -> anyhow::Result<&str> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!("`{id}` is not an id");
    }
    Ok(id)
}

/// `90s`, `10m`, `2h`, `7d` → seconds. A bare number is refused: `--ttl 10` could mean
/// seconds or minutes, and guessing wrong mints a token for the wrong length of time.
fn parse_duration(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 30s, 10m, 24h or 7d"))?;
    let mult = match unit {
        "" => {
            return Err(format!(
                "`{text}` has no unit: add a unit, e.g. {n}s or {n}m (s, m, h or d)"
            ))
        }
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d, e.g. 10m")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("`{text}` must be longer than zero")),
        Some(secs) => Ok(secs),
        None => Err(format!("`{text}` is too long to count in seconds")),
    }
}
