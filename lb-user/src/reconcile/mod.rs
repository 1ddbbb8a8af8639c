//! The reconciler: a pure diff from the desired tables to the programmed ones, emitting map
//! operations through a [`MapWriter`]. Only what changed is written; a resync with no change
//! writes nothing.
//!
//! Two ways in: [`Reconciler::reconcile`] rebuilds every service from a whole model and diffs
//! every table (the first sync, and the periodic resync that repairs whatever was missed);
//! [`Reconciler::reconcile_services`] rebuilds only the services a change names and diffs only
//! the entries they own or share, so a change costs the size of its services, not of the node.

mod claims;
mod desired;
mod diff;
mod drains;
mod ids;
mod ledger;
mod slot_runs;
mod state;

#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, VecDeque},
    net::Ipv4Addr,
};

use lb_common::maps::{ConntrackKey, ConntrackValue};
use tracing::{debug, info_span};

use self::{
    desired::by_service,
    drains::Rebuilt,
    ledger::{Batch, Layout, Ledger},
};
pub use self::{
    desired::{Desired, SlotMode, desired, node_config},
    diff::{for_each_op, removed_pairs},
    drains::{Drains, Forget},
    ids::Ids,
    state::DatapathState,
};
use crate::{
    config::NodeConfig,
    error::Result,
    loader::Capacities,
    maps::{KernelMaps, MapOp, MapWriter},
    model::{Model, ServiceName, ServicePort},
};

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct Report {
    /// How many map operations were written.
    pub writes: usize,
    /// Every part of the model that could not be programmed (all services, not only the
    /// rebuilt ones).
    pub problems: Vec<String>,
    /// The sticky clients and UDP flows the maps must forget.
    pub forget: Forget,
}

/// Keeps the programmed state, the id allocation and who owns which entries between
/// reconciles.
#[derive(Debug)]
pub struct Reconciler {
    programmed: DatapathState,
    ids: Ids,
    mode: SlotMode,
    ledger: Ledger,
    /// From the last full reconcile: a change of node addresses calls for a full one.
    node_port_addresses: Vec<Ipv4Addr>,
    drains: Drains,
}

impl Reconciler {
    /// Starts from what is programmed (empty for a fresh datapath, read from the pinned maps
    /// after a restart): the first reconcile then writes only the difference, never a flush.
    pub fn new(programmed: DatapathState, mode: SlotMode) -> Self {
        Self::with_capacities(programmed, mode, &Capacities::default())
    }

    /// [`Reconciler::new`] for maps loaded with other sizes: ids must fit them.
    pub fn with_capacities(
        programmed: DatapathState,
        mode: SlotMode,
        capacities: &Capacities,
    ) -> Self {
        let ids = Ids::from_programmed(&programmed, capacities);
        Self {
            programmed,
            ids,
            mode,
            ledger: Ledger::adopted(),
            node_port_addresses: Vec::new(),
            drains: Drains::default(),
        }
    }

    /// The UDP flows kept on endpoints that still serve outside their frontend's slots.
    pub fn drains(&self) -> &Drains {
        &self.drains
    }

    /// A reconciler for the datapath as its maps hold it (programmed by an earlier daemon, or
    /// left part-written by a failed sync): what is programmed, the UDP flows in the
    /// conntrack map that run outside their frontend's slots (see [`Drains::adopt`]), and the
    /// sticky clients of backends no slot holds (see [`Drains::adopt_affinities`]).
    pub fn resume(maps: &KernelMaps, mode: SlotMode, capacities: &Capacities) -> Result<Self> {
        let mut reconciler = Self::with_capacities(DatapathState::read(maps)?, mode, capacities);
        reconciler.adopt_flows(&maps.conntrack()?);
        reconciler.drains.adopt_affinities(&maps.affinities()?, &reconciler.programmed);
        Ok(reconciler)
    }

    /// Takes up the UDP flows in `conntrack` that run outside their frontend's slots; before
    /// the first reconcile.
    fn adopt_flows(&mut self, conntrack: &[(ConntrackKey, ConntrackValue)]) {
        self.drains.adopt(conntrack, &self.programmed);
    }

    pub fn programmed(&self) -> &DatapathState {
        &self.programmed
    }

    /// Brings the maps to the state `model` asks for, every service and every table (entries
    /// no service owns, such as those an earlier daemon left, go too). On a write error the
    /// programmed state is unknown in part: call [`Reconciler::new`] again with what the maps
    /// hold.
    pub fn reconcile(
        &mut self,
        model: &Model,
        node: &NodeConfig,
        writer: &mut impl MapWriter,
    ) -> Result<Report> {
        let span = info_span!("reconcile", service_ports = model.ports.len());
        let _entered = span.enter();
        let earlier = std::mem::take(&mut self.ledger);
        self.node_port_addresses.clone_from(&model.node_port_addresses);
        let layout = Layout {
            mode: self.mode,
            node_port_addresses: &self.node_port_addresses,
            programmed: &self.programmed,
            earlier: Some(&earlier),
        };
        let mut batch =
            Batch::new(DatapathState { node: Some(node_config(node)), ..DatapathState::default() });
        // In id order nobody displaces anybody: the first claimant of a frontend keeps it.
        for ports in by_service(&model.ports) {
            let service = ports[0].id.service();
            self.ledger.rebuild_service(&service, ports, &layout, &mut self.ids, &mut batch);
        }
        self.ledger.settle(&mut batch, &self.programmed, &mut self.ids);
        let desired = batch.after;
        let mut chunk = Chunk::default();
        for_each_op(&self.programmed, &desired, |op| chunk.push(op, writer, |_| {}))?;
        let written = chunk.finish(writer, |_| {})?;
        let removed = removed_pairs(&self.programmed, &desired);
        let rebuilt = Rebuilt {
            before: &self.programmed,
            after: &desired,
            serving: &batch.serving,
            every_frontend: true,
        };
        let forget = self.drains.settle(removed, &rebuilt);
        self.programmed = desired;
        self.ids.retain_used(&self.programmed);
        self.ids.commit();
        debug!(written, forget_pairs = forget.affinities.len(), "reconciled");
        Ok(Report { writes: written, problems: self.ledger.problems(), forget })
    }

    /// Rebuilds the services in `changed` from `ports_of` (a service's ports sorted by id, none
    /// for a service that is gone) and writes what differs from what they own. Services whose
    /// frontends a rebuilt one takes over or gives up are rebuilt too, through `ports_of`.
    /// The node configuration must be the one of the last [`Reconciler::reconcile`].
    pub fn reconcile_services(
        &mut self,
        changed: impl IntoIterator<Item = ServiceName>,
        mut ports_of: impl FnMut(&ServiceName) -> Vec<ServicePort>,
        writer: &mut impl MapWriter,
    ) -> Result<Report> {
        let mut queue: VecDeque<ServiceName> = VecDeque::new();
        let mut queued = BTreeSet::new();
        for service in changed {
            if queued.insert(service.clone()) {
                queue.push_back(service);
            }
        }
        let span = info_span!("reconcile_services", services = queue.len());
        let _entered = span.enter();
        let layout = Layout {
            mode: self.mode,
            node_port_addresses: &self.node_port_addresses,
            programmed: &self.programmed,
            earlier: None,
        };
        let mut batch = Batch::default();
        while let Some(service) = queue.pop_front() {
            queued.remove(&service);
            let ports = ports_of(&service);
            self.ledger.rebuild_service(&service, &ports, &layout, &mut self.ids, &mut batch);
            for woken in batch.wake.drain(..) {
                if queued.insert(woken.clone()) {
                    queue.push_back(woken);
                }
            }
        }
        self.ledger.settle(&mut batch, &self.programmed, &mut self.ids);
        let before = batch.before(&self.programmed);
        let programmed = &mut self.programmed;
        let mut chunk = Chunk::default();
        for_each_op(&before, &batch.after, |op| chunk.push(op, writer, |op| programmed.apply(op)))?;
        let written = chunk.finish(writer, |op| programmed.apply(op))?;
        self.ids.commit();
        let removed = removed_pairs(&before, &batch.after);
        let rebuilt = Rebuilt {
            before: &before,
            after: &batch.after,
            serving: &batch.serving,
            every_frontend: false,
        };
        let forget = self.drains.settle(removed, &rebuilt);
        debug!(written, forget_pairs = forget.affinities.len(), "reconciled");
        Ok(Report { writes: written, problems: self.ledger.problems(), forget })
    }
}

/// Operations on their way to the writer, handed over a few thousand at a time so that it can
/// batch runs of them (one system call per run instead of per entry) while a first sync of
/// millions of entries is never held whole.
#[derive(Default)]
struct Chunk {
    ops: Vec<MapOp>,
    written: usize,
}

impl Chunk {
    const SIZE: usize = 4096;

    /// Queues `op`; writes the chunk once it is full, calling `written` for each operation.
    fn push(
        &mut self,
        op: MapOp,
        writer: &mut impl MapWriter,
        written: impl FnMut(&MapOp),
    ) -> Result<()> {
        self.ops.push(op);
        if self.ops.len() >= Self::SIZE {
            self.write(writer, written)?;
        }
        Ok(())
    }

    /// Writes what is queued; returns how many operations were written in all.
    fn finish(mut self, writer: &mut impl MapWriter, written: impl FnMut(&MapOp)) -> Result<usize> {
        self.write(writer, written)?;
        Ok(self.written)
    }

    fn write(&mut self, writer: &mut impl MapWriter, written: impl FnMut(&MapOp)) -> Result<()> {
        writer.apply_all(&self.ops)?;
        self.ops.iter().for_each(written);
        self.written += self.ops.len();
        self.ops.clear();
        Ok(())
    }
}
