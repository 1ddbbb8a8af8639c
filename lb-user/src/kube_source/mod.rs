//! The Kubernetes source of the desired model: kube-rs watchers of Services, EndpointSlices and
//! this node's Node. Services and slices are kept in the compact normalised form the model is
//! built from (a store of full API objects took several times the memory); the Node, one
//! object, in a reflector store.
//!
//! The stores follow kube-rs's list-then-watch semantics: a list (the first one, or a re-list
//! after the watch fell out of the API server's window with 410 Gone) is buffered and swapped in
//! whole when it completes (`Init`, `InitApply`..., `InitDone`), so a store never shows a
//! half-listed or empty state once it is ready. While the API server is unreachable the stores
//! keep the last known objects and the watchers retry with exponential backoff. The daemon
//! therefore only ever sees complete states and converges without a flush. Each Service and
//! EndpointSlice is decoded on its own (`decoded`), so that one the client cannot read is named
//! and left out rather than failing the list it came in.

mod changes;
mod client;
mod decoded;
mod node;
mod state;
mod store;

#[cfg(any(test, feature = "scripted-api-server"))]
pub mod api_server;
#[cfg(test)]
mod tests;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    config::{InferConfigError, KubeconfigError},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, info, warn};

pub use self::{
    changes::Changes,
    client::client,
    node::{node_eligible, node_ipv4_addresses, node_zone},
};
use self::{
    decoded::Decoded,
    state::{Applied, Objects},
};
use crate::{
    config::NodeConfig,
    model::{ServiceModel, ServiceName, ServiceObjects},
};

/// Services that name another proxy in this label are that proxy's to serve, not ours; kube-proxy
/// leaves them out with the same selector. The model skips them too, but filtering on the server
/// keeps them out of memory on big clusters.
pub const SERVICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name";

/// Only slices that belong to a Service (the label the EndpointSlice controller sets); like
/// kube-proxy, not those of headless services (never programmed) or of services another proxy
/// serves: the EndpointSlice controller copies the service's labels to its slices and marks
/// those of headless services.
pub const SLICE_LABEL_SELECTOR: &str = "kubernetes.io/service-name,\
     !service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// What the source lists and watches, as (API group, resource): what the daemon's RBAC role
/// must grant `list` and `watch` on (`deploy/lb-xdp.yaml`).
pub fn watched_resources() -> [(&'static str, &'static str); 3] {
    fn resource<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
        (K::GROUP, K::URL_PATH_SEGMENT)
    }
    [resource::<Service>(), resource::<EndpointSlice>(), resource::<Node>()]
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },

    #[error(
        "no Kubernetes client configuration: no usable kubeconfig (KUBECONFIG, ~/.kube/config) \
         and not running in a pod"
    )]
    InferConfig(#[source] InferConfigError),

    #[error("building the Kubernetes client")]
    Client(#[source] Box<kube::Error>),

    #[error("the {kind} watcher stopped before its first list completed")]
    WatcherStopped { kind: &'static str },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Watches v1 Services and discovery.k8s.io/v1 EndpointSlices in all namespaces into compact
/// normalised objects, and this node's Node object into a reflector store. Dropping it stops the
/// watchers.
pub struct KubeSource {
    objects: Arc<Mutex<Objects>>,
    /// Whether the first list of Services, of EndpointSlices, completed.
    services_listed: watch::Receiver<bool>,
    slices_listed: watch::Receiver<bool>,
    node: Store<Node>,
    node_name: String,
    /// The IPv4 addresses the Node last reported, kept while it reports none or is gone for a
    /// moment (deleted and registered again): the node's NodePorts and SNAT address stay.
    /// Updated at every Node event, not only when a sync reads them.
    node_ips: watch::Receiver<Vec<Ipv4Addr>>,
    /// What the Node watch last showed of this node.
    node_seen: watch::Receiver<NodeSeen>,
    /// The watcher tasks; a `JoinSet` aborts them when dropped.
    _watchers: JoinSet<()>,
}

impl KubeSource {
    /// Starts the watchers on `client` (on the current Tokio runtime). Every change to the
    /// objects sends `()` on `nudge`; when the channel is full a nudge is already pending and the
    /// new one is dropped.
    ///
    /// Services carrying `service.kubernetes.io/service-proxy-name` are not watched (see
    /// [`SERVICE_LABEL_SELECTOR`]), nor are slices outside [`SLICE_LABEL_SELECTOR`]; the Node
    /// watch selects `metadata.name=<node_name>`.
    pub fn start(client: Client, node_name: &str, nudge: mpsc::Sender<()>) -> Self {
        let mut watchers = JoinSet::new();
        let objects = Arc::new(Mutex::new(Objects::default()));
        let held = Arc::clone(&objects);
        let services_listed = spawn_watcher(
            &mut watchers,
            Api::<Decoded<Service>>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            nudge.clone(),
            move |event| lock(&held).on_service(event),
        );
        let held = Arc::clone(&objects);
        let slices_listed = spawn_watcher(
            &mut watchers,
            Api::<Decoded<EndpointSlice>>::all(client.clone()),
            watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
            nudge.clone(),
            move |event| lock(&held).on_slice(event),
        );
        let (node_ips_sender, node_ips) = watch::channel(Vec::new());
        let (node_seen_sender, node_seen) = watch::channel(NodeSeen::default());
        let this_node = ObjectRef::new(node_name);
        let node = spawn_reflector(
            &mut watchers,
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            nudge,
            move |store| {
                let object = store.get(&this_node);
                node_seen_sender.send_modify(|seen| seen.update(object.as_deref()));
                let reported = object.map(|node| node_ipv4_addresses(&node));
                let reported = reported.unwrap_or_default();
                if !reported.is_empty() {
                    node_ips_sender.send_if_modified(|known| {
                        let changed = *known != reported;
                        *known = reported;
                        changed
                    });
                }
            },
        );
        Self {
            objects,
            services_listed,
            slices_listed,
            node,
            node_name: node_name.to_owned(),
            node_ips,
            node_seen,
            _watchers: watchers,
        }
    }

    /// Waits until the first list of Services and of EndpointSlices has completed. The daemon
    /// must not reconcile before: an empty store would unprogram everything an earlier daemon
    /// left in the maps. The Node is not waited for here: where the configuration lists the
    /// node's addresses, the Node's only refine them, and a wrong node name must not stop the
    /// node from serving ([`KubeSource::node_addressed`] waits where it does not).
    pub async fn ready(&self) -> Result<()> {
        let (services, slices) =
            tokio::join!(listed(&self.services_listed), listed(&self.slices_listed));
        services.map_err(|()| Error::WatcherStopped { kind: "Service" })?;
        slices.map_err(|()| Error::WatcherStopped { kind: "EndpointSlice" })
    }

    /// The services whose objects changed since the last call (all of them the first time).
    /// Take the changes before reading the objects: a change in between is then seen twice,
    /// never missed.
    pub fn take_changes(&self) -> Changes {
        lock(&self.objects).take_changes()
    }

    /// The objects of one service as the source holds them now, normalised for `node`.
    pub fn service_objects(&self, service: &ServiceName, node: &NodeConfig) -> ServiceObjects {
        lock(&self.objects).service_objects(service, node)
    }

    /// Every service's part of the model for `node`, by name (a full sync's input). One
    /// service's objects are built at a time, so that the whole set never exists twice over,
    /// each under the lock only briefly, so that the watchers are not held up for the whole
    /// build. A service changed meanwhile is read as it is then; its change is also recorded
    /// for the next sync, as with any change after [`KubeSource::take_changes`].
    pub fn service_models(&self, node: &NodeConfig) -> Vec<(ServiceName, ServiceModel)> {
        let names = lock(&self.objects).service_names();
        names
            .into_iter()
            .map(|name| {
                let objects = lock(&self.objects).service_objects(&name, node);
                let model = objects.model(&name);
                (name, model)
            })
            .collect()
    }

    /// This node's Node, if it has been listed, and this node's IPv4 addresses: those the Node
    /// reports, or the last ones it reported (none before it has).
    pub fn node(&self) -> (Option<Node>, Vec<Ipv4Addr>) {
        let node = self.node.get(&ObjectRef::new(&self.node_name)).map(|node| (*node).clone());
        (node, self.node_ips.borrow().clone())
    }

    /// Whether this node is to take load balancer traffic, as its Node last said: not while it
    /// is being deleted or marked for deletion, and still not once it is gone (kube-proxy judges
    /// a deleted Node by its last state too). Eligible before the Node is seen.
    pub fn node_eligible(&self) -> bool {
        self.node_seen.borrow().eligible
    }

    /// Services and EndpointSlices the API returned that did not decode, each named, as
    /// problems to report.
    pub fn decode_problems(&self) -> Vec<String> {
        lock(&self.objects).problems()
    }

    /// A problem to report while the Node list holds no Node of this node's name: every
    /// endpoint is then remote to it (they name their node), which a wrong `nodeName` causes,
    /// or the Node's deletion.
    pub fn node_problem(&self) -> Option<String> {
        let name = &self.node_name;
        let (what, hint) = match self.node_seen.borrow().presence {
            NodePresence::NotListed | NodePresence::Present => return None,
            NodePresence::Gone => {
                (format!("the Node {name:?} is gone from the API"), "it was deleted")
            }
            NodePresence::NeverSeen => {
                (format!("no Node named {name:?} in the API"), "check nodeName or --node-name")
            }
        };
        Some(format!(
            "{what}: no endpoint is local to this node (Local traffic policies drop, health \
             check node ports answer 503); {hint}"
        ))
    }

    /// Waits until this node's Node has reported an IPv4 address, warning every 30 s meanwhile
    /// (a wrong node name, or a Node the kubelet has not registered yet).
    pub async fn node_addressed(&self) {
        const WARN_EVERY: Duration = Duration::from_secs(30);
        let mut reported = self.node_ips.clone();
        loop {
            let addressed = reported.wait_for(|ips| !ips.is_empty());
            match tokio::time::timeout(WARN_EVERY, addressed).await {
                // Addressed, or the watchers are gone (only when the source is dropped).
                Ok(_) => return,
                Err(_) => {
                    warn!(node = %self.node_name, "still no IPv4 address from the Node object; nothing is programmed before one");
                }
            }
        }
    }
}

/// What the Node watch has shown of this node's Node.
#[derive(Debug, Clone, Copy)]
struct NodeSeen {
    presence: NodePresence,
    /// As the Node last present said (see [`KubeSource::node_eligible`]).
    eligible: bool,
}

/// Whether this node's Node is in the watch's store, and has been since the daemon started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodePresence {
    /// The first list has not completed.
    NotListed,
    /// Not in any list or event so far.
    NeverSeen,
    Present,
    /// Present before, deleted since.
    Gone,
}

impl Default for NodeSeen {
    fn default() -> Self {
        Self { presence: NodePresence::NotListed, eligible: true }
    }
}

impl NodeSeen {
    /// After the watch's store changed: `node` is this node's Node in it now, if any.
    fn update(&mut self, node: Option<&Node>) {
        self.presence = match (node, self.presence) {
            (Some(node), _) => {
                self.eligible = node_eligible(node);
                NodePresence::Present
            }
            (None, NodePresence::Present | NodePresence::Gone) => NodePresence::Gone,
            (None, NodePresence::NotListed | NodePresence::NeverSeen) => NodePresence::NeverSeen,
        };
    }
}

/// Waits for the first complete list; `Err` if the watcher stopped before.
async fn listed(listed: &watch::Receiver<bool>) -> std::result::Result<(), ()> {
    listed.clone().wait_for(|listed| *listed).await.map(|_| ()).map_err(|_| ())
}

/// Runs a watcher of `api` whose events `apply` records; returns whether its first list
/// completed.
fn spawn_watcher<K>(
    watchers: &mut JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    nudge: mpsc::Sender<()>,
    mut apply: impl FnMut(watcher::Event<K>) -> Applied + Send + 'static,
) -> watch::Receiver<bool>
where
    K: kube::Resource<DynamicType = ()> + k8s_openapi::Resource,
    K: Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (listed, receiver) = watch::channel(false);
    // The default backoff (exponential from 0.8 s to 30 s, reset after 2 minutes without errors)
    // keeps a restarting API server from being hammered by every node at once.
    let events = watcher(api, config).default_backoff();
    watchers.spawn(events.for_each(move |event| {
        match event {
            // Recorded before the nudge, so that the sync it wakes sees the change.
            Ok(event) => match apply(event) {
                Applied::Buffered => {}
                Applied::Changed => nudge_daemon(&nudge),
                Applied::Listed { objects } => {
                    debug!(kind = K::KIND, objects, "list complete; store replaced");
                    listed.send_replace(true);
                    nudge_daemon(&nudge);
                }
            },
            Err(error) => log_watch_error(K::KIND, &error),
        }
        std::future::ready(())
    }));
    receiver
}

/// Runs a watcher of `api` into a new reflector store; returns the store. `changed` sees the
/// store after every event that changed it, before the daemon is nudged.
fn spawn_reflector<K>(
    watchers: &mut JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    nudge: mpsc::Sender<()>,
    changed: impl Fn(&Store<K>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + k8s_openapi::Resource,
    K: Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let seen = store.clone();
    let events = watcher(api, config).default_backoff().reflect(writer);
    watchers.spawn(events.for_each(move |event| {
        // The reflector has applied the event by the time it reaches here; a list in progress
        // is buffered by the reflector and has not changed the store yet.
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changed(&seen);
                nudge_daemon(&nudge);
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => log_watch_error(K::KIND, &error),
        }
        std::future::ready(())
    }));
    store
}

fn nudge_daemon(nudge: &mpsc::Sender<()>) {
    // Full: a nudge is pending and covers this change. Closed: the daemon is stopping.
    let _ = nudge.try_send(());
}

fn log_watch_error(kind: &'static str, error: &watcher::Error) {
    if is_gone(error) {
        // Routine after a long quiet spell or an API server restart: the watch window moved
        // past our resourceVersion. The watcher re-lists; the store changes when it completes.
        info!(kind, %error, "watch expired; re-listing, keeping the last known objects");
    } else {
        warn!(kind, %error, "watch failed; retrying with backoff, keeping the last known objects");
    }
}

/// The watch fell out of the API server's window (410 Gone in a watch ERROR event).
fn is_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(status) if status.code == 410)
}

/// The objects' lock. A watcher that panicked holding it left at worst one event half recorded,
/// which the periodic full resync repairs; stopping every later sync would not.
fn lock(objects: &Mutex<Objects>) -> MutexGuard<'_, Objects> {
    objects.lock().unwrap_or_else(PoisonError::into_inner)
}
