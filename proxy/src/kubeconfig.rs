//! `kache kubeconfig`: a kubeconfig whose cluster is this proxy, so that
//! `KUBECONFIG=<(kache kubeconfig) kubectl …` goes through kache.

use base64::Engine;
use kache_config::{Config, KubeconfigArgs, TlsConfig};
use serde_json::{json, Value};

use crate::tls::generated_ca_path;

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error(transparent)]
    Config(#[from] kache_config::ConfigError),
    #[error("reading the CA certificate {path}: {source}")]
    Ca { path: String, source: std::io::Error },
    #[error("rendering: {0}")]
    Render(#[from] serde_saphyr::SerializeError),
}

/// Renders the kubeconfig as YAML. The namespace of the upstream
/// kubeconfig's context is kept, so `kubectl` defaults stay the same.
///
/// # Errors
/// An invalid configuration, an unreadable CA certificate.
pub fn render(args: &KubeconfigArgs) -> Result<String, KubeconfigError> {
    let config = Config::load(&args.serve)?;
    let tls = config.listener.tls.as_ref();
    let server = args.server.clone().unwrap_or_else(|| {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = config.listener.addr;
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        format!("{scheme}://{host}:{}", addr.port())
    });

    let mut cluster = json!({ "server": server });
    if server.starts_with("https://") {
        if let Some(tls) = tls {
            let ca_path = match tls {
                TlsConfig::SelfSigned { dir } => generated_ca_path(dir),
                TlsConfig::Files { cert, .. } => cert.clone(),
            };
            let ca = std::fs::read(&ca_path).map_err(|source| KubeconfigError::Ca {
                path: ca_path.display().to_string(),
                source,
            })?;
            cluster["certificate-authority-data"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(ca));
        }
    }
    let user = match &config.listener.access_token {
        Some(token) => json!({ "token": token }),
        None => json!({}),
    };
    let mut context = json!({ "cluster": "kache", "user": "kache" });
    if let Some(namespace) = upstream_namespace(&config) {
        context["namespace"] = Value::String(namespace);
    }
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "kache", "cluster": cluster }],
        "users": [{ "name": "kache", "user": user }],
        "contexts": [{ "name": "kache", "context": context }],
        "current-context": "kache",
        "preferences": {},
    });
    Ok(serde_saphyr::to_string(&kubeconfig)?)
}

/// The default namespace of the upstream kubeconfig's context, if any.
fn upstream_namespace(config: &Config) -> Option<String> {
    let kubeconfig = match &config.upstream.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path).ok()?,
        None => kube::config::Kubeconfig::read().ok()?,
    };
    let name = config
        .upstream
        .context
        .clone()
        .or(kubeconfig.current_context.clone())?;
    kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == name)?
        .context
        .as_ref()?
        .namespace
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use kache_config::{Cli, Command};

    fn args(flags: &[&str]) -> KubeconfigArgs {
        match Cli::try_parse_from(["kache", "kubeconfig"].iter().chain(flags))
            .expect("flags")
            .command
        {
            Command::Kubeconfig(args) => args,
            other => panic!("expected kubeconfig, got {other:?}"),
        }
    }

    #[test]
    fn the_default_server_is_the_listen_address() {
        let text = render(&args(&[
            "--listen",
            "127.0.0.1:7777",
            "--kubeconfig",
            "/nonexistent",
        ]))
        .expect("render");
        let value: Value = serde_saphyr::from_str(&text).expect("yaml");
        assert_eq!(value["clusters"][0]["cluster"]["server"], "http://127.0.0.1:7777");
        assert_eq!(value["current-context"], "kache");
        assert_eq!(value["users"][0]["user"], json!({}));
    }

    #[test]
    fn upstream_namespace_and_access_token_are_carried_over() {
        let dir = std::env::temp_dir().join(format!("kache-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let upstream = dir.join("upstream");
        std::fs::write(
            &upstream,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://10.0.0.1'}}]\n\
             users: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u, namespace: team-a}}]\n\
             current-context: x\n",
        )
        .expect("write");
        let token = dir.join("token");
        std::fs::write(&token, "t0ken").expect("write");
        let text = render(&args(&[
            "--kubeconfig",
            upstream.to_str().expect("utf-8"),
            "--access-token-file",
            token.to_str().expect("utf-8"),
            "--server",
            "http://localhost:9",
        ]))
        .expect("render");
        std::fs::remove_dir_all(&dir).ok();
        let value: Value = serde_saphyr::from_str(&text).expect("yaml");
        assert_eq!(value["contexts"][0]["context"]["namespace"], "team-a");
        assert_eq!(value["users"][0]["user"]["token"], "t0ken");
        assert_eq!(value["clusters"][0]["cluster"]["server"], "http://localhost:9");
    }
}
