//! `deploy/lb-xdp.yaml`, the DaemonSet an operator applies in place of kube-proxy's, checked
//! against the daemon it runs: every document is a valid object of its kind, the role grants
//! what the daemon watches to the account the pods run as, and the container's arguments,
//! environment, mounts and probe are what the daemon's command line and node configuration
//! expect. (The daemon taking its name and addresses this way is tested on the scripted API
//! server in `kubernetes_api.rs`.)

use std::path::Path;

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_tests::deploy::{self, object};
use lb_user::{
    attach,
    cli::{self, Cli, Command},
    config::NodeConfig,
    kube_source,
};

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set.spec.template.spec.as_ref().expect("a pod spec")
}

fn container(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "one container");
    &pod.containers[0]
}

/// The host directory mounted where `path` lies in the container, and the mount's propagation.
fn host_path_under<'a>(pod: &'a PodSpec, path: &Path) -> (&'a str, Option<&'a str>) {
    let (volume, mount) = volume_under(pod, path);
    let host =
        volume.host_path.as_ref().unwrap_or_else(|| panic!("{}: not a hostPath", path.display()));
    (&host.path, mount.mount_propagation.as_deref())
}

fn volume_under<'a>(
    pod: &'a PodSpec,
    path: &Path,
) -> (&'a Volume, &'a k8s_openapi::api::core::v1::VolumeMount) {
    let mounts = container(pod).volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| path.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let volume = volumes.iter().find(|v| v.name == mount.name).expect("the mount's volume");
    (volume, mount)
}

#[test]
fn every_document_is_a_kind_checked_here() {
    let kinds: Vec<_> = deploy::documents().iter().map(|d| d["kind"].clone()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"],
        "a new kind in the file needs its checks here"
    );
}

#[test]
fn the_role_grants_what_the_daemon_watches_to_the_pods_account() {
    let role: ClusterRole = object();
    let binding: ClusterRoleBinding = object();
    let account: ServiceAccount = object();
    let daemon_set: DaemonSet = object();
    let rules = role.rules.as_deref().unwrap_or_default();
    for (group, resource) in kube_source::watched_resources() {
        for verb in ["list", "watch"] {
            let granted = rules.iter().any(|rule| {
                rule.api_groups.as_deref().unwrap_or_default().iter().any(|g| g == group)
                    && rule.resources.as_deref().unwrap_or_default().iter().any(|r| r == resource)
                    && rule.verbs.iter().any(|v| v == verb)
            });
            assert!(granted, "{verb} on {resource} (group {group:?}) is not granted");
        }
    }
    assert_eq!(
        (binding.role_ref.kind.as_str(), &binding.role_ref.name),
        ("ClusterRole", &role.metadata.name.expect("named"))
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    let bound = subjects.iter().any(|s| {
        s.kind == "ServiceAccount"
            && Some(&s.name) == account.metadata.name.as_ref()
            && s.namespace == account.metadata.namespace
    });
    assert!(bound, "the binding does not name the ServiceAccount");
    assert_eq!(pod_spec(&daemon_set).service_account_name, account.metadata.name);
    assert_eq!(daemon_set.metadata.namespace, account.metadata.namespace);
}

#[test]
fn the_daemonset_runs_the_daemon_as_its_command_line_and_configuration_expect() {
    let daemon_set: DaemonSet = object();
    let config_map: ConfigMap = object();
    let pod = pod_spec(&daemon_set);
    let container = container(pod);
    let args = container.args.as_deref().expect("arguments");
    let cli =
        Cli::try_parse_from(std::iter::once("lb-user").chain(args.iter().map(String::as_str)))
            .unwrap_or_else(|e| panic!("the DaemonSet's arguments: {e}"));
    let Command::Run { manifests, node_config, targets, pin_dir, healthz_address, .. } =
        cli.command
    else {
        panic!("the DaemonSet does not run the daemon: {args:?}");
    };
    assert_eq!(manifests, None, "the daemon watches the Kubernetes API");

    // The node configuration file is the ConfigMap's, whose node.yaml serves every node once the
    // node's name is supplied (the pod's NODE_NAME) and its addresses come from its Node.
    let (volume, mount) = volume_under(pod, &node_config);
    let source = volume.config_map.as_ref().expect("the node configuration is a ConfigMap");
    assert_eq!(Some(&source.name), config_map.metadata.name.as_ref());
    let key = node_config.strip_prefix(&mount.mount_path).expect("under the mount");
    let data = config_map.data.as_ref().expect("data");
    assert!(data.contains_key(key.to_str().expect("UTF-8")), "{key:?} not in the ConfigMap");
    let text = deploy::node_config_text();
    let error = NodeConfig::from_yaml_str(&text).expect_err("no node is named in the file");
    assert!(error.to_string().starts_with("nodeName is missing"), "{error}");
    // As the daemon completes it from this command line and the pod's NODE_NAME.
    let supplied = cli::supplied(Some("node-a".into()), manifests.as_deref());
    NodeConfig::from_yaml_str_with(&text, &supplied)
        .unwrap_or_else(|e| panic!("the ConfigMap's node.yaml: {e}"));
    let env = container.env.as_deref().unwrap_or_default();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME is set");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    let command = Cli::command();
    let run = command.find_subcommand("run").expect("run");
    let name_argument = run.get_arguments().find(|a| a.get_id() == "node_name");
    let read_from = name_argument.and_then(|a| a.get_env());
    assert_eq!(read_from, Some("NODE_NAME".as_ref()), "--node-name reads NODE_NAME");

    // Pins made in the pod must outlive it (a restarted daemon adopts them); the cgroup hooks
    // go on the host's cgroup tree, not the container's.
    assert_eq!(host_path_under(pod, &pin_dir), ("/sys/fs/bpf", Some("HostToContainer")));
    let bpffs_volume = &volume_under(pod, &pin_dir).0.name;
    let mounts_bpffs = pod.init_containers.as_deref().unwrap_or_default().iter().any(|init| {
        let privileged = init.security_context.as_ref().and_then(|s| s.privileged);
        let mounts = init.volume_mounts.as_deref().unwrap_or_default();
        privileged == Some(true)
            && init.image == container.image
            && mounts.iter().any(|m| {
                &m.name == bpffs_volume && m.mount_propagation.as_deref() == Some("Bidirectional")
            })
    });
    assert!(mounts_bpffs, "an init container mounts bpffs where the host has not");
    let cgroup = attach::Targets::from(targets).host_cgroup.expect("--host-cgroup");
    assert_eq!(host_path_under(pod, &cgroup).0, "/sys/fs/cgroup");
    assert_eq!(pod.host_network, Some(true), "the node's interfaces and health check ports");
    let privileged = container.security_context.as_ref().and_then(|s| s.privileged);
    assert_eq!(privileged, Some(true), "BPF programs, links and pins");

    let healthz = healthz_address.0.expect("/healthz served");
    for (kind, probe) in
        [("liveness", &container.liveness_probe), ("startup", &container.startup_probe)]
    {
        let probe = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let probe = probe.unwrap_or_else(|| panic!("an HTTP {kind} probe"));
        assert_eq!(probe.path.as_deref(), Some("/livez"), "{kind}");
        assert_eq!(
            probe.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(healthz.port().into()),
            "the {kind} probe asks the port the daemon answers on"
        );
    }
}
