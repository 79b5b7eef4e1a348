//! Connecting to the cluster the way kubectl does: `--kubeconfig`, `--context`,
//! `-n/--namespace` (else the context's namespace, else `default`).

use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use crate::cli::ClusterArgs;
use crate::error::CliError;

/// A client and the namespaces the command works in.
#[derive(Clone)]
pub struct Cluster {
    /// The API client.
    pub client: kube::Client,
    /// The namespace namespaced commands use.
    pub namespace: String,
    /// Where the operator keeps its CA and Deployment.
    pub operator_namespace: String,
}

impl Cluster {
    /// Loads the kubeconfig named by `args` (or the default chain) and builds a client.
    pub async fn connect(args: &ClusterArgs) -> Result<Self, CliError> {
        let config = Self::config(args).await?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client =
            kube::Client::try_from(config).map_err(|e| CliError::Kubeconfig(e.to_string()))?;
        Ok(Self {
            client,
            namespace,
            operator_namespace: args.operator_namespace.clone(),
        })
    }

    /// The client configuration `args` name, the way kubectl finds it.
    pub async fn config(args: &ClusterArgs) -> Result<Config, CliError> {
        let options = KubeConfigOptions {
            context: args.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match (&args.kubeconfig, &args.context) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| CliError::Kubeconfig(format!("{}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| CliError::Kubeconfig(format!("{}: {e}", path.display())))?
            }
            (None, Some(_)) => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| CliError::Kubeconfig(e.to_string()))?,
            (None, None) => Config::infer()
                .await
                .map_err(|e| CliError::Kubeconfig(e.to_string()))?,
        };
        Ok(config)
    }
}
