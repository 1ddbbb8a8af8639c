//! One sync of the daemon, from a source's services to the maps: either every service (the
//! first sync, the periodic resync, a new node configuration) or only the services a change
//! names. Besides the reconciler it keeps what the model said about each service (objects
//! skipped, notes, health checks), so that a sync of a few services still reports the whole
//! picture.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    config::NodeConfig,
    error::Result,
    maps::MapWriter,
    model::{HealthCheck, Model, ServiceModel, ServiceName, not_ipv4_note},
    reconcile::{Reconciler, Report},
};

pub struct ControlPlane {
    reconciler: Reconciler,
    /// The node configuration of the last full sync: a service sync must build with the same.
    node: Option<NodeConfig>,
    /// What the model said about each service that had something to say.
    remembered: Remembered,
}

#[derive(Default)]
struct Remembered {
    /// Only services with something to say.
    remarks: BTreeMap<ServiceName, Remarks>,
    health_checks: BTreeMap<ServiceName, HealthCheck>,
}

/// How a remark about a service left to DNS or another proxy by design starts: logged at debug
/// level, not as a problem (a cluster may have thousands of headless services).
pub const NOT_PROXIED: &str = "not proxied: ";

/// What the model said about one service.
#[derive(Debug, Default)]
struct Remarks {
    lines: Vec<String>,
    not_ipv4_slices: usize,
}

impl Remarks {
    fn of(model: &ServiceModel) -> Self {
        let skipped =
            model.skipped.iter().map(|s| format!("not programmed: {}: {}", s.object, s.reason));
        let not_proxied =
            model.not_proxied.iter().map(|s| format!("{NOT_PROXIED}{}: {}", s.object, s.reason));
        let notes = model.notes.iter().map(|note| format!("note: {note}"));
        let lines = skipped.chain(not_proxied).chain(notes).collect();
        Self { lines, not_ipv4_slices: model.not_ipv4_slices }
    }

    fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.not_ipv4_slices == 0
    }
}

impl ControlPlane {
    pub fn new(reconciler: Reconciler) -> Self {
        Self { reconciler, node: None, remembered: Remembered::default() }
    }

    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    /// Whether the next sync must rebuild every service: none was done yet, or the node
    /// configuration changed (node addresses decide NodePort frontends).
    pub fn needs_full_sync(&self, node: &NodeConfig) -> bool {
        self.node.as_ref() != Some(node)
    }

    /// Rebuilds and reprograms every service; entries of services not in `services` go.
    pub fn sync_all(
        &mut self,
        services: impl IntoIterator<Item = (ServiceName, ServiceModel)>,
        node: &NodeConfig,
        writer: &mut impl MapWriter,
    ) -> Result<Report> {
        let mut model =
            Model { node_port_addresses: node.node_port_addresses(), ..Model::default() };
        self.remembered = Remembered::default();
        for (name, part) in services {
            self.remembered.remember(name, &part);
            model.ports.extend(part.ports);
        }
        model.ports.sort_by(|a, b| a.id.cmp(&b.id));
        // Until it succeeds, the next sync must be a full one again.
        self.node = None;
        let report = self.reconciler.reconcile(&model, node, writer)?;
        self.node = Some(node.clone());
        Ok(report)
    }

    /// Rebuilds and reprograms the services in `changed` (and those whose frontends they take
    /// or give up) from `model_of`. Call [`ControlPlane::sync_all`] first.
    pub fn sync_services(
        &mut self,
        changed: BTreeSet<ServiceName>,
        mut model_of: impl FnMut(&ServiceName) -> ServiceModel,
        writer: &mut impl MapWriter,
    ) -> Result<Report> {
        let remembered = &mut self.remembered;
        self.reconciler.reconcile_services(
            changed,
            |name| {
                let part = model_of(name);
                remembered.remember(name.clone(), &part);
                part.ports
            },
            writer,
        )
    }

    /// Every object skipped and every note, as log lines.
    pub fn remarks(&self) -> impl Iterator<Item = String> + '_ {
        let remarks = &self.remembered.remarks;
        let not_ipv4 = remarks.values().map(|r| r.not_ipv4_slices).sum();
        remarks
            .values()
            .flat_map(|r| r.lines.iter().cloned())
            .chain(not_ipv4_note(not_ipv4).map(|note| format!("note: {note}")))
    }

    /// The health checks of the services programmed, by service.
    pub fn health_checks(&self) -> &BTreeMap<ServiceName, HealthCheck> {
        &self.remembered.health_checks
    }
}

impl Remembered {
    fn remember(&mut self, name: ServiceName, model: &ServiceModel) {
        match model.health_check {
            Some(check) => self.health_checks.insert(name.clone(), check),
            None => self.health_checks.remove(&name),
        };
        let part = Remarks::of(model);
        if part.is_empty() {
            self.remarks.remove(&name);
        } else {
            self.remarks.insert(name, part);
        }
    }
}
