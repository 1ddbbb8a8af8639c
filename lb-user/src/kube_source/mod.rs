//! The Kubernetes source of the desired model: kube-rs watchers of Services, EndpointSlices and
//! this node's Node, each feeding a reflector store that the daemon reads a [`Snapshot`] from.
//!
//! The stores follow kube-rs's list-then-watch semantics: a list (the first one, or a re-list
//! after the watch fell out of the API server's window with 410 Gone) is buffered and swapped in
//! whole when it completes (`Init`, `InitApply`..., `InitDone`), so a store never shows a
//! half-listed or empty state once it is ready. While the API server is unreachable the stores
//! keep the last known objects and the watchers retry with exponential backoff. The daemon
//! therefore only ever sees complete states and converges without a flush.

mod changes;
mod client;
mod node;

#[cfg(any(test, feature = "scripted-api-server"))]
pub mod api_server;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt as _,
    config::{InferConfigError, KubeconfigError},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinSet};
use tracing::{debug, info, warn};

use self::changes::ChangeLog;
pub use self::{changes::Changes, client::client, node::node_ipv4_addresses};
use crate::{
    config::NodeConfig,
    model::{ServiceName, ServiceObjects, service_name},
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

/// The objects the model is built from, as the stores hold them now.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Sorted by namespace and name.
    pub services: Vec<Service>,
    /// Sorted by namespace and name.
    pub slices: Vec<EndpointSlice>,
    /// This node; `None` until its list completes, and if the API server has no Node of this name.
    pub node: Option<Node>,
}

/// Watches v1 Services and discovery.k8s.io/v1 EndpointSlices in all namespaces, and this node's
/// Node object, into reflector stores. Dropping it stops the watchers.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    node_name: String,
    changes: Arc<Mutex<ChangeLog>>,
    /// The watcher tasks; a `JoinSet` aborts them when dropped.
    _watchers: JoinSet<()>,
}

impl KubeSource {
    /// Starts the watchers on `client` (on the current Tokio runtime). Every change to a store
    /// sends `()` on `nudge`; when the channel is full a nudge is already pending and the new one
    /// is dropped.
    ///
    /// Services carrying `service.kubernetes.io/service-proxy-name` are not watched (see
    /// [`SERVICE_LABEL_SELECTOR`]), nor are slices outside [`SLICE_LABEL_SELECTOR`]; the Node
    /// watch selects `metadata.name=<node_name>`.
    pub fn start(client: Client, node_name: &str, nudge: mpsc::Sender<()>) -> Self {
        let mut watchers = JoinSet::new();
        let changes = Arc::new(Mutex::new(ChangeLog::default()));
        let log = Arc::clone(&changes);
        let services = spawn_reflector(
            &mut watchers,
            Api::all(client.clone()),
            watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            nudge.clone(),
            move |event, _| lock(&log).on_service(event),
        );
        let log = Arc::clone(&changes);
        let slices = spawn_reflector(
            &mut watchers,
            Api::all(client.clone()),
            watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
            nudge.clone(),
            move |event, store| lock(&log).on_slice(event, store),
        );
        let node = spawn_reflector(
            &mut watchers,
            Api::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            nudge,
            |_, _| {},
        );
        Self {
            services,
            slices,
            node,
            node_name: node_name.to_owned(),
            changes,
            _watchers: watchers,
        }
    }

    /// Waits until the first list of Services and of EndpointSlices has completed. The daemon
    /// must not reconcile before: an empty store would unprogram everything an earlier daemon
    /// left in the maps. The Node is not waited for: its addresses only refine the configured
    /// ones, and a wrong node name must not stop the node from serving.
    pub async fn ready(&self) -> Result<()> {
        let (services, slices) =
            tokio::join!(self.services.wait_until_ready(), self.slices.wait_until_ready());
        services.map_err(|_| Error::WatcherStopped { kind: "Service" })?;
        slices.map_err(|_| Error::WatcherStopped { kind: "EndpointSlice" })
    }

    /// The services whose objects changed since the last call (all of them the first time).
    /// Take the changes before reading the objects: a change in between is then seen twice,
    /// never missed.
    pub fn take_changes(&self) -> Changes {
        lock(&self.changes).take()
    }

    /// The objects of one service as the stores hold them now, normalised for `node`.
    pub fn service_objects(&self, service: &ServiceName, node: &NodeConfig) -> ServiceObjects {
        let mut objects = ServiceObjects::default();
        let reference = ObjectRef::new(&service.name).within(&service.namespace);
        if let Some(object) = self.services.get(&reference) {
            objects.add_service(&object);
        }
        for slice in lock(&self.changes).slices_of(service) {
            if let Some(object) =
                self.slices.get(&ObjectRef::new(&slice).within(&service.namespace))
            {
                objects.add_slice(&object, node);
            }
        }
        objects
    }

    /// The objects of every service as the stores hold them now, normalised for `node`,
    /// without copying the API objects (a full sync's input).
    pub fn objects_by_service(&self, node: &NodeConfig) -> BTreeMap<ServiceName, ServiceObjects> {
        let mut by_service: BTreeMap<ServiceName, ServiceObjects> = BTreeMap::new();
        for service in self.services.state() {
            by_service.entry(service_name(&service)).or_default().add_service(&service);
        }
        for slice in self.slices.state() {
            ServiceObjects::add_slice_to(&mut by_service, &slice, node);
        }
        by_service
    }

    /// This node's Node, if it has been listed.
    pub fn node(&self) -> Option<Node> {
        self.node.get(&ObjectRef::new(&self.node_name)).map(|node| (*node).clone())
    }

    /// Clones of the stores' objects, and this node's Node if it has been listed.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: sorted_clones(&self.services),
            slices: sorted_clones(&self.slices),
            node: self.node.get(&ObjectRef::new(&self.node_name)).map(|node| (*node).clone()),
        }
    }
}

/// Runs a watcher of `api` into a new store; returns the store.
fn spawn_reflector<K>(
    watchers: &mut JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    nudge: mpsc::Sender<()>,
    record: impl Fn(&watcher::Event<K>, &Store<K>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + k8s_openapi::Resource,
    K: Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // The default backoff (exponential from 0.8 s to 30 s, reset after 2 minutes without errors)
    // keeps a restarting API server from being hammered by every node at once.
    let events = watcher(api, config).default_backoff().reflect(writer);
    let reader = store.clone();
    watchers.spawn(events.for_each(move |event| {
        // Recorded before the nudge, so that the sync it wakes sees the change.
        if let Ok(event) = &event {
            record(event, &reader);
        }
        on_event(K::KIND, event.as_ref(), &reader, &nudge);
        std::future::ready(())
    }));
    store
}

/// Nudges the daemon after every event that changed the store (the reflector has applied it by
/// the time it reaches here), and logs watch errors.
fn on_event<K: kube::Resource<DynamicType = ()> + Clone>(
    kind: &'static str,
    event: std::result::Result<&watcher::Event<K>, &watcher::Error>,
    store: &Store<K>,
    nudge: &mpsc::Sender<()>,
) {
    match event {
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
            // Full: a nudge is pending and covers this change. Closed: the daemon is stopping.
            let _ = nudge.try_send(());
        }
        Ok(watcher::Event::InitDone) => {
            debug!(kind, objects = store.len(), "list complete; store replaced");
            let _ = nudge.try_send(());
        }
        // A list in progress is buffered by the reflector: the store has not changed yet.
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
        Err(error) if is_gone(error) => {
            // Routine after a long quiet spell or an API server restart: the watch window moved
            // past our resourceVersion. The watcher re-lists; the store changes when it completes.
            info!(kind, %error, "watch expired; re-listing, keeping the last known objects");
        }
        Err(error) => {
            warn!(kind, %error, "watch failed; retrying with backoff, keeping the last known objects");
        }
    }
}

/// The watch fell out of the API server's window (410 Gone in a watch ERROR event).
fn is_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(status) if status.code == 410)
}

fn sorted_clones<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut objects: Vec<K> = store.state().iter().map(|object| (**object).clone()).collect();
    objects.sort_by_cached_key(|object| (object.namespace(), object.name_any()));
    objects
}

/// The change log's lock. A watcher that panicked holding it left at worst one event half
/// recorded, which the periodic full resync repairs; stopping every later sync would not.
fn lock(changes: &Mutex<ChangeLog>) -> MutexGuard<'_, ChangeLog> {
    changes.lock().unwrap_or_else(PoisonError::into_inner)
}
