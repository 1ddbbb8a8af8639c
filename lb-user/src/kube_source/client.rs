//! The API server client the watchers use.

use std::path::Path;

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{Error, Result};

/// The client from a kubeconfig file, or else the configuration kube-rs infers: `KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account.
///
/// A node replacing kube-proxy should be given a kubeconfig naming the API server's real address:
/// the in-cluster address is the `kubernetes` Service's ClusterIP, which this daemon is the one to
/// program.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => config_from_file(path).await?,
        None => kube::Config::infer().await.map_err(Error::InferConfig)?,
    };
    Client::try_from(config).map_err(|e| Error::Client(Box::new(e)))
}

/// The file's current context, as kubectl would use it.
async fn config_from_file(path: &Path) -> Result<kube::Config> {
    let error = |source| Error::Kubeconfig { path: path.to_owned(), source };
    let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(error)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A kubeconfig file in the temporary directory, removed when dropped.
    struct TempKubeconfig(PathBuf);

    impl TempKubeconfig {
        fn new(test: &str, yaml: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("lb-user-kubeconfig-{test}-{}.yaml", std::process::id()));
            std::fs::write(&path, yaml)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            Self(path)
        }
    }

    impl Drop for TempKubeconfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[tokio::test]
    async fn a_kubeconfig_file_gives_a_client_for_its_current_context() {
        // https, so the TLS stack (rustls with ring) is set up too; nothing is connected to.
        let file = TempKubeconfig::new(
            "good",
            "apiVersion: v1
kind: Config
current-context: test
clusters:
- name: test
  cluster: { server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true }
users:
- name: test
  user: { token: not-a-secret }
contexts:
- name: test
  context: { cluster: test, user: test, namespace: lb }
",
        );
        let client = client(Some(&file.0)).await.expect("a client from the kubeconfig");
        assert_eq!(client.default_namespace(), "lb", "the current context's namespace");
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_file_is_named_in_the_error() {
        let path = Path::new("/nonexistent/lb-user/kubeconfig");
        let Err(error) = client(Some(path)).await else { panic!("a client without a kubeconfig") };
        assert!(
            matches!(&error, Error::Kubeconfig { path: p, .. } if p == path),
            "unexpected error: {error:?}"
        );
        assert_eq!(error.to_string(), "reading kubeconfig /nonexistent/lb-user/kubeconfig");
    }
}
